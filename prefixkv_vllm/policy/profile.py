"""Offline per-layer keep ratios (a "profile"), stored as versioned JSON.

Example::

    {
      "format": "prefixkv-profile",
      "version": 1,
      "model": {"name": "SmolLM2-135M-Instruct", "num_layers": 30,
                "layers": [0, 1, ..., 29], "num_kv_heads": 3, "head_dim": 64},
      "scorer": "mean",
      "entries": [{"budget": 0.2, "keep_ratios": [0.51, 0.18, ...]}],
      "provenance": {"tool": "prefixkv calibrate", "samples": 16, ...}
    }

A profile covers the model's compressed layers only: its full-attention layers
(sliding-window and other local layers keep vLLM's own cache). ``num_layers``
counts them and ``layers`` gives their indices in the model, ascending (absent in
older profiles, meaning ``0 .. num_layers - 1``). Each entry's ``keep_ratios`` has
one ratio in (0, 1] per compressed layer, in that order, averaging to the entry's
``budget``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

FORMAT = "prefixkv-profile"
VERSION = 1
BUDGET_TOLERANCE = 0.01  # mean of per-layer ratios vs the entry's budget


class ProfileError(ValueError):
    """A profile that is malformed, or does not fit the model or budget asked for."""


@dataclass(frozen=True)
class ModelIdentity:
    name: str
    num_layers: int  # compressed (full-attention) layers
    num_kv_heads: int
    head_dim: int
    layers: tuple[int, ...] | None = None  # their indices in the model; None: 0 .. num_layers - 1

    def __post_init__(self):
        layers = tuple(range(self.num_layers)) if self.layers is None else tuple(self.layers)
        if len(layers) != self.num_layers:
            raise ProfileError(f"profile lists {len(layers)} layer indices for {self.num_layers} layers")
        if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in layers) or list(layers) != sorted(set(layers)):
            raise ProfileError(f"profile layer indices must be distinct non-negative integers, ascending: {list(layers)[:8]}")
        object.__setattr__(self, "layers", layers)


@dataclass(frozen=True)
class Profile:
    model: ModelIdentity
    scorer: str
    entries: dict[float, tuple[float, ...]]  # budget -> per-layer keep ratios
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if not self.entries:
            raise ProfileError("profile has no entries")
        for budget, ratios in self.entries.items():
            _check_entry(budget, ratios, self.model.num_layers)

    def keep_ratios(self, budget: float) -> tuple[float, ...]:
        """The entry for ``budget``; a loss profile (``prefixkv calibrate --criterion loss``) serves any other
        budget from its measured per-layer costs, as calibration allocated its own entries."""
        for entry_budget, ratios in self.entries.items():
            if math.isclose(entry_budget, budget, abs_tol=1e-9):
                return ratios
        curves = self.ratio_curves()
        if curves is None:
            available = ", ".join(f"{b:g}" for b in sorted(self.entries))
            raise ProfileError(f"profile has no entry for budget {budget:g} (it has: {available})")
        from .costs import ratio_at

        try:
            return tuple(ratio_at(curve, budget) for curve in curves)
        except ValueError as exc:  # below its smallest measured ratio
            raise ProfileError(f"loss profile cannot allocate budget {budget:g}: {exc}") from None

    def ratio_curves(self) -> tuple[tuple[tuple[float, float], ...], ...] | None:
        """A loss profile's allocation at every budget, per layer (``costs.allocation_curves``); None for other profiles."""
        if "kl_per_layer" not in self.provenance:
            return None
        import torch

        from .costs import allocation_curves

        try:
            costs = torch.tensor(self.provenance["kl_per_layer"], dtype=torch.float64)
            if costs.shape[0] != self.model.num_layers:
                raise ValueError(f"its costs cover {costs.shape[0]} layers, not {self.model.num_layers}")
            return allocation_curves(self.provenance["loss_ratios"], costs)
        except (KeyError, TypeError, ValueError) as exc:
            raise ProfileError(f"loss profile has unusable costs: {exc}") from None

    def check_model(self, layers: Sequence[int], num_kv_heads: int, head_dim: int) -> None:
        """``layers``: the indices of the model's compressed (full-attention) layers."""
        expected = (self.model.num_layers, self.model.num_kv_heads, self.model.head_dim)
        actual = (len(layers), num_kv_heads, head_dim)
        if expected != actual:
            raise ProfileError(
                f"profile is for {self.model.name} (compressed layers, kv heads, head dim = {expected}), "
                f"but the model has {actual}"
            )
        if self.model.layers != tuple(layers):
            raise ProfileError(
                f"profile is for {self.model.name} with full attention in layers {list(self.model.layers)}, "
                f"but the model has it in layers {list(layers)}"
            )

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "model": {**vars(self.model), "layers": list(self.model.layers)},
            "scorer": self.scorer,
            "entries": [{"budget": b, "keep_ratios": list(r)} for b, r in sorted(self.entries.items())],
            "provenance": self.provenance,
        }

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def from_json(cls, data: Any) -> "Profile":
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ProfileError(f"not a PrefixKV profile (expected \"format\": \"{FORMAT}\")")
        if data.get("version") != VERSION:
            raise ProfileError(f"unsupported profile version {data.get('version')!r} (this build reads {VERSION})")
        try:
            model = ModelIdentity(
                name=str(data["model"]["name"]),
                num_layers=_positive_int(data["model"]["num_layers"], "model.num_layers"),
                num_kv_heads=_positive_int(data["model"]["num_kv_heads"], "model.num_kv_heads"),
                head_dim=_positive_int(data["model"]["head_dim"], "model.head_dim"),
                layers=None if data["model"].get("layers") is None else tuple(data["model"]["layers"]),
            )
            entries: dict[float, tuple[float, ...]] = {}
            for entry in data["entries"]:
                budget = float(entry["budget"])
                if budget in entries:
                    raise ProfileError(f"profile lists budget {budget:g} twice")
                entries[budget] = tuple(float(r) for r in entry["keep_ratios"])
            return cls(model, str(data["scorer"]), entries, dict(data.get("provenance", {})))
        except ProfileError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise ProfileError(f"malformed profile: missing or wrong-typed field ({exc})") from None

    @classmethod
    def load(cls, path: str | Path) -> "Profile":
        try:
            data = json.loads(Path(path).read_text())
        except OSError as exc:
            raise ProfileError(f"cannot read profile {path}: {exc.strerror}") from None
        except json.JSONDecodeError as exc:
            raise ProfileError(f"profile {path} is not valid JSON: {exc}") from None
        return cls.from_json(data)


def average_keep_ratios(per_sample_counts: Sequence[Sequence[int]], prompt_lens: Sequence[int]) -> tuple[float, ...]:
    """Per-layer ratios averaged over calibration samples (each sample: kept counts per layer)."""
    if not per_sample_counts or len(per_sample_counts) != len(prompt_lens):
        raise ValueError("need one prompt length per calibration sample, and at least one sample")
    num_layers = len(per_sample_counts[0])
    if any(len(counts) != num_layers for counts in per_sample_counts):
        raise ValueError("calibration samples disagree on the number of layers")
    return tuple(
        sum(counts[layer] / length for counts, length in zip(per_sample_counts, prompt_lens)) / len(prompt_lens)
        for layer in range(num_layers)
    )


def _check_entry(budget: float, ratios: Sequence[float], num_layers: int) -> None:
    if not 0.0 < budget <= 1.0:
        raise ProfileError(f"profile budget {budget:g} is outside (0, 1]")
    if len(ratios) != num_layers:
        raise ProfileError(f"profile entry for budget {budget:g} has {len(ratios)} ratios for {num_layers} layers")
    bad = [r for r in ratios if not (math.isfinite(r) and 0.0 < r <= 1.0)]
    if bad:
        raise ProfileError(f"profile entry for budget {budget:g} has keep ratios outside (0, 1]: {bad[:3]}")
    mean = sum(ratios) / num_layers
    if abs(mean - budget) > BUDGET_TOLERANCE:
        raise ProfileError(f"profile entry for budget {budget:g} averages {mean:.4f}, not its budget")


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ProfileError(f"profile field {name} must be a positive integer, got {value!r}")
    return value
