"""The plugin's settings, carried through vLLM as ``additional_config``.

``--kv-policy prefixkv --kv-budget 0.2`` and ``--additional-config
'{"kv_policy": "prefixkv", "kv_budget": 0.2}'`` produce the same dict, which
vLLM hands to every process (and hashes into its compile cache).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .policy import CRITERIA, POLICY_NAMES, SCORERS
from .policy.budget import check_budget
from .policy.paged import DECODE_MODES

ADMISSION_MODES = ("reserve", "stock")


class PrefixKVConfigError(ValueError):
    """A setting that cannot work; raised at start-up with a one-line reason."""


@dataclass(frozen=True)
class PrefixKVConfig:
    policy: str = "none"
    budget: float = 0.2
    # Measured (benchmarks/results/quality-default.md, 48 prompts): SnapKV's pooled window
    # score found more needles than the plain window score for uniform at budgets 0.2 and
    # 0.5, and with the loss criterion (how much compressing each layer changes the model's
    # next-token distributions, calibrated on documents, needles and chat) prefixkv had the
    # best ROUGE-L at both budgets, ahead of uniform's best beyond noise at 0.2; the
    # paper's attention-mass rule was below uniform.
    scorer: str = "snapkv"
    criterion: str = "loss"  # how calibration shares the budget across layers (policy.costs)
    window: int = 32
    sink: int = 1
    # Measured (benchmarks/results/quality-recent64.md): keeping the last 64 prompt
    # tokens (the question, usually) raised ROUGE-L at budget 0.2 for every
    # scorer/allocation pair tried; the paper protects only the last token.
    recent: int = 64
    per_kv_head: bool = False
    # Decode-time eviction (policy.paged): "fifo" keeps the compressed prompt and the
    # newest generated tokens, "scored" re-selects prompt and output by the attention of
    # the last `window` decode queries, "off" keeps every generated token.
    decode: str = "fifo"
    # Generated tokens between decode rounds, in whole blocks (start-up rounds this default up
    # to them). Measured (benchmarks/results/throughput-1024+512-interval.md and
    # quality-interval.md): a round every 32 tokens rather than 128 lowers each request's peak
    # enough that admission ran all 48 requests of the 1024+512 load at once instead of 44
    # (1.86x stock's output tok/s against 1.60x in the same run), and ROUGE-L of 512-token
    # answers did not move (0.293 against 0.292 at budget 0.2; 0.567 for both at 0.5).
    decode_interval: int = 32
    # "reserve": admit a request only if its peak and the running requests' growth fit
    # (vllm_adapter.admission); "stock": vLLM's rule (admit if the prompt fits).
    admission: str = "reserve"
    tiers: int = 0  # KV-cache groups for the per-layer ratios; 0 = one per layer
    profile: str | None = None
    # Resolved once at start-up: the indices of the compressed (full-attention) layers,
    # and one keep ratio per compressed layer (profile or calibration), in that order.
    layers: tuple[int, ...] | None = None
    keep_ratios: tuple[float, ...] | None = None
    # With a loss profile, also each layer's ratio at any request budget (knots (budget,
    # ratio), policy.costs.allocation_curves); None: request budgets rescale keep_ratios.
    ratio_curves: tuple[tuple[tuple[float, float], ...], ...] | None = None

    def __post_init__(self):
        if self.policy not in POLICY_NAMES:
            raise PrefixKVConfigError(f"unknown --kv-policy {self.policy!r}; choose one of {', '.join(POLICY_NAMES)}")
        try:
            object.__setattr__(self, "budget", check_budget(self.budget))
        except ValueError as exc:
            raise PrefixKVConfigError(f"--kv-budget {exc}") from None
        if self.scorer not in SCORERS:
            raise PrefixKVConfigError(f"unknown --kv-scorer {self.scorer!r}; choose one of {', '.join(SCORERS)}")
        if self.criterion not in CRITERIA:
            raise PrefixKVConfigError(f"unknown --kv-criterion {self.criterion!r}; choose one of {', '.join(CRITERIA)}")
        if self.admission not in ADMISSION_MODES:
            raise PrefixKVConfigError(f"unknown --kv-admission {self.admission!r}; choose one of {', '.join(ADMISSION_MODES)}")
        if self.decode not in DECODE_MODES:
            raise PrefixKVConfigError(f"unknown --kv-decode {self.decode!r}; choose one of {', '.join(DECODE_MODES)}")
        for name, minimum in (("window", 1), ("sink", 0), ("recent", 1), ("tiers", 0), ("decode_interval", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise PrefixKVConfigError(f"--kv-{name.replace('_', '-')} must be an integer >= {minimum}, got {value!r}")
        if self.decode == "scored" and self.window > self.decode_interval:
            raise PrefixKVConfigError(
                f"--kv-window {self.window} must not exceed --kv-decode-interval {self.decode_interval} "
                "(scored decoding reads the last window queries before each round)"
            )
        if self.profile is not None and self.policy != "prefixkv":
            raise PrefixKVConfigError(f"--kv-profile sets per-layer ratios; --kv-policy {self.policy} does not use one")

    @property
    def active(self) -> bool:
        return self.policy != "none"

    @classmethod
    def from_additional_config(cls, additional_config: Any) -> PrefixKVConfig:
        data = additional_config if isinstance(additional_config, dict) else {}
        names = {field.name for field in dataclasses.fields(cls)}
        # Only our own keys are read: additional_config is shared with vLLM and other
        # plugins, whose kv_* keys must pass untouched (the flags catch our typos).
        kwargs = {name: data[f"kv_{name}"] for name in names if f"kv_{name}" in data}
        if kwargs.get("keep_ratios") is not None:
            kwargs["keep_ratios"] = tuple(float(r) for r in kwargs["keep_ratios"])
        if kwargs.get("ratio_curves") is not None:
            kwargs["ratio_curves"] = tuple(tuple((float(b), float(r)) for b, r in curve) for curve in kwargs["ratio_curves"])
        if kwargs.get("layers") is not None:
            kwargs["layers"] = tuple(int(i) for i in kwargs["layers"])
        return cls(**kwargs)

    def to_additional_config(self) -> dict[str, Any]:
        return {
            f"kv_{f.name}": (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
            for f in dataclasses.fields(self)
        }

    def with_keep_ratios(self, ratios: tuple[float, ...], curves=None) -> PrefixKVConfig:
        return dataclasses.replace(self, keep_ratios=tuple(ratios), ratio_curves=curves)


def default_cache_dir() -> Path:
    """Where built demo models and start-up calibrations are kept: ``$PREFIXKV_CACHE_DIR``,
    else ``$XDG_CACHE_HOME/prefixkv``, else ``~/.cache/prefixkv``."""
    explicit = os.environ.get("PREFIXKV_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    # The XDG spec says an empty value counts as unset.
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "prefixkv"
