"""`vllm serve` settings the plugin cannot run stop at start-up with one line, on the real demo model.

No server comes up: each start-up is a `vllm serve` that fails in about 10 s.
"""

from __future__ import annotations

import json
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from prefixkv_vllm.tools.demo_model import demo_model_path  # noqa: E402

from .vllm_server import run_startup_failure  # noqa: E402

# Settings that must stop `vllm serve` with one line (the last two write their profile or
# model first, in the fixture). One flag error goes through `vllm serve`; the others are
# checked on the parser itself (tests/test_plugin.py), the same code without a 13 s start.
BAD_SETTINGS = {
    "budget": (("--kv-policy", "prefixkv", "--kv-budget", "1.5"), "argument --kv-budget: must be a number in (0, 1]"),
    "profile path": (("--kv-policy", "prefixkv", "--kv-profile", "/nonexistent/profile.json"), "prefixkv: error: --kv-profile /nonexistent/profile.json: cannot read profile"),
    "tiers": (("--kv-policy", "prefixkv", "--kv-tiers", "7"), "prefixkv: error: --kv-tiers 7 must divide the model's 30 layers evenly"),
    "loss range": (("--kv-policy", "prefixkv", "--kv-budget", "0.02"), "prefixkv: error: --kv-criterion loss: the loss criterion measures keep ratios from 0.05; budget 0.02 is below"),
    "per-token cache scales": (("--kv-policy", "uniform", "--kv-cache-dtype", "int8_per_token_head"), "prefixkv: error: PrefixKV does not support --kv-cache-dtype int8_per_token_head (fp8, fp8_e4m3 and fp8_e5m2 are supported)"),
    "backend": (("--kv-policy", "uniform", "--attention-backend", "FLASH_ATTN"), "prefixkv: error: PrefixKV runs its own attention backend (CUSTOM, wrapping the stock one); drop --attention-backend FLASH_ATTN"),
    "connector": (("--kv-policy", "uniform", "--kv-transfer-config", '{"kv_connector": "ExampleConnector", "kv_role": "kv_both"}'), "prefixkv: error: PrefixKV does not support KV connectors (--kv-transfer-config)"),
    "mismatched profile": ((), "profile is for other"),
    "sliding window": ((), "PrefixKV has nothing to compress"),
}


def _mismatched_profile(directory: Path) -> Path:
    profile = {
        "format": "prefixkv-profile",
        "version": 1,
        "model": {"name": "other", "num_layers": 2, "num_kv_heads": 3, "head_dim": 64},
        "scorer": "window",
        "entries": [{"budget": 0.2, "keep_ratios": [0.3, 0.1]}],
        "provenance": {},
    }
    path = directory / "profile.json"
    path.write_text(json.dumps(profile))
    return path


def _sliding_window_model(directory: Path) -> Path:
    config = json.loads((demo_model_path() / "config.json").read_text())
    config.update(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=64)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        (directory / name).write_bytes((demo_model_path() / name).read_bytes())
    (directory / "config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="module")
def failed_start_ups(model, log_dir, tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """Every start-up of BAD_SETTINGS, run side by side: each is a `vllm serve` of about 10 s, mostly imports."""
    commands = {name: (model, *args) for name, (args, _) in BAD_SETTINGS.items() if args}
    profile = _mismatched_profile(tmp_path_factory.mktemp("mismatched-profile"))
    commands["mismatched profile"] = (model, "--kv-policy", "prefixkv", "--kv-budget", "0.2", "--kv-profile", str(profile))
    commands["sliding window"] = (str(_sliding_window_model(tmp_path_factory.mktemp("sliding-window"))), "--kv-policy", "uniform")
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        running = {name: pool.submit(run_startup_failure, *command, log_dir=log_dir) for name, command in commands.items()}
        return {name: future.result() for name, future in running.items()}


@pytest.mark.parametrize("name", list(BAD_SETTINGS))
def test_bad_settings_fail_at_start_up_with_one_line(failed_start_ups, name):
    result, message = failed_start_ups[name], BAD_SETTINGS[name][1]
    assert result.returncode != 0
    assert message in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
