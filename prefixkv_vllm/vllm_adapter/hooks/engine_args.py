"""``EngineArgs``: the ``--kv-*`` flags, folded into ``additional_config``, and start-up (``startup``)."""

from __future__ import annotations

import argparse
import functools

from ...config import ADMISSION_MODES, PrefixKVConfig
from ...policy import CRITERIA, POLICY_NAMES, SCORERS
from ...policy.budget import check_budget
from ...policy.paged import DECODE_MODES

# Flag names double as additional_config keys.
FLAGS = (
    "kv_policy", "kv_budget", "kv_profile", "kv_scorer", "kv_window", "kv_criterion", "kv_sink", "kv_recent",
    "kv_per_kv_head", "kv_tiers", "kv_decode", "kv_decode_interval", "kv_admission",
)  # fmt: skip


def _budget(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    try:
        return check_budget(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_flags(parser):
    d = PrefixKVConfig  # every default lives there
    group = parser.add_argument_group("PrefixKV", "Per-layer KV-cache budgets after prefill (prefixkv-vllm)")
    group.add_argument("--kv-policy", choices=POLICY_NAMES, default=argparse.SUPPRESS, help="KV eviction policy (default: none, stock vLLM)")
    group.add_argument("--kv-budget", type=_budget, default=argparse.SUPPRESS, help=f"mean fraction of prompt KV kept across layers, in (0, 1] (default {d.budget})")
    group.add_argument("--kv-profile", default=argparse.SUPPRESS, help="JSON profile of per-layer keep ratios (prefixkv); without one, ratios are calibrated at start-up and cached")
    group.add_argument("--kv-scorer", choices=list(SCORERS), default=argparse.SUPPRESS, help=f"token importance score (default: {d.scorer})")
    group.add_argument("--kv-window", type=int, default=argparse.SUPPRESS, help=f"last prompt queries the window and snapkv scorers read (default {d.window})")
    group.add_argument("--kv-criterion", choices=CRITERIA, default=argparse.SUPPRESS, help=f"prefixkv without --kv-profile: how start-up calibration shares the budget across layers; loss: where compressing changes the output least; attention: the paper's equal share of attention mass (default {d.criterion})")
    group.add_argument("--kv-sink", type=int, default=argparse.SUPPRESS, help=f"first prompt tokens always kept (default {d.sink})")
    group.add_argument("--kv-recent", type=int, default=argparse.SUPPRESS, help=f"most recent tokens always kept: the end of the prompt, and of the output at each decode round (default {d.recent})")
    group.add_argument("--kv-per-kv-head", action="store_true", default=argparse.SUPPRESS, help="select tokens per KV head instead of per layer")
    group.add_argument("--kv-decode", choices=DECODE_MODES, default=argparse.SUPPRESS, help=f"eviction while decoding: fifo, scored, or off (default {d.decode})")
    group.add_argument("--kv-decode-interval", type=int, default=argparse.SUPPRESS, help=f"generated tokens between decode-time eviction rounds, a multiple of the block size (default {d.decode_interval})")
    group.add_argument("--kv-admission", choices=ADMISSION_MODES, default=argparse.SUPPRESS, help=f"reserve: admit only requests whose peak KV fits beside the running ones'; stock: vLLM's rule (default {d.admission})")
    group.add_argument("--kv-tiers", type=int, default=argparse.SUPPRESS, help=f"KV-cache groups for the per-layer ratios, 0: one per layer (default {d.tiers})")
    return parser


def install() -> None:
    """Patch ``EngineArgs`` (on any vLLM: start-up only, inert without a policy)."""
    from vllm.engine.arg_utils import EngineArgs

    original_add = EngineArgs.add_cli_args
    original_from = EngineArgs.from_cli_args.__func__
    original_create = EngineArgs.create_engine_config

    @functools.wraps(original_add)
    def add_cli_args(parser, *args, **kwargs):
        parser = original_add(parser, *args, **kwargs)
        if not any(a.dest == "kv_policy" for a in parser._actions):
            add_flags(parser)
        return parser

    @functools.wraps(original_from)
    def from_cli_args(cls, args):
        engine_args = original_from(cls, args)
        # Unset flags leave additional_config alone.
        flags = {name: getattr(args, name) for name in FLAGS if hasattr(args, name)}
        if flags:
            engine_args.additional_config = {**(engine_args.additional_config or {}), **flags}
        return engine_args

    @functools.wraps(original_create)
    def create_engine_config(self, *args, **kwargs):
        vllm_config = original_create(self, *args, **kwargs)
        from ..startup import configure_engine

        configure_engine(vllm_config)
        return vllm_config

    EngineArgs.add_cli_args = staticmethod(add_cli_args)
    EngineArgs.from_cli_args = classmethod(from_cli_args)
    EngineArgs.create_engine_config = create_engine_config
