"""The small, explicit settings unit tests build policies and layouts with.

The library's functions take every setting as a required argument (the server's
defaults live in ``config.PrefixKVConfig`` only); these are the tests' own.
"""

from __future__ import annotations

from pathlib import Path

from prefixkv_vllm.policy import build_policy
from prefixkv_vllm.policy.paged import PagedLayout

POLICY = {"scorer": "window", "per_kv_head": False, "window": 32, "sink": 1, "recent": 1}
LAYOUT = {"sink": 1, "recent": 1, "decode": "off", "interval": 32, "prefix_caching": False}


def policy(name: str, budget: float, **settings):
    return build_policy(name, budget, **{**POLICY, **settings})


def layout(block_size: int, **settings) -> PagedLayout:
    return PagedLayout(block_size, **{**LAYOUT, **settings})


# What start-up calibrates for the demo model with the default settings (test_calibrate checks its
# recipe): the committed profile the benchmarks use, passed so that server tests do not spend 222 s calibrating.
DEFAULT_PROFILE = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "profiles" / "SmolLM2-135M-Instruct-default.json"
