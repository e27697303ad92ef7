"""Offline per-layer keep ratios (a "profile"), stored as versioned JSON.

Example (a loss profile of the demo model, shortened where ``...``)::

    {
      "format": "prefixkv-profile",
      "version": 2,
      "model": {"name": "SmolLM2-135M-Instruct", "num_layers": 30, "num_kv_heads": 3,
                "head_dim": 64, "layers": [0, 1, ..., 29]},
      "scorer": "snapkv",
      "entries": [{"budget": 0.2, "keep_ratios": [0.05, 0.05, 0.1, ...]},
                  {"budget": 0.5, "keep_ratios": [0.3, 0.4, 0.4, ...]}],
      "costs": {"ratios": [0.05, 0.1, 0.2, 0.3, 0.4, 0.55, 0.7, 0.85],
                "kl_per_layer": [[0.00054, 0.00042, 0.00023, ...], ...]},
      "provenance": {"tool": "prefixkv calibrate", "criterion": "loss", "samples": 8, ...}
    }

A profile covers the model's compressed layers only: its full-attention layers
(sliding-window and other local layers keep vLLM's own cache). ``num_layers``
counts them and ``layers`` gives their indices in the model, ascending (absent in
older profiles, meaning ``0 .. num_layers - 1``). Each entry's ``keep_ratios`` has
one ratio in (0, 1] per compressed layer, in that order, averaging to the entry's
``budget``.

``costs`` (loss profiles; null in others, and an absent field reads the same)
serves every other budget: ``kl_per_layer[i][j]`` is the mean KL divergence of the
model's next-token distributions when only compressed layer ``i`` keeps
``ratios[j]`` of its prompt (keeping everything costs 0). ``Profile.keep_ratios``
allocates a budget without an entry from them (``costs.allocate_by_cost``), and
``Profile.ratio_curves`` gives each layer's ratio at any request budget.
``provenance`` only records how the profile was made; nothing reads it to serve.

Version 1 kept the costs in ``provenance`` (``loss_ratios`` and ``kl_per_layer``);
such files still load, their costs moved to ``costs``, and are saved as version 2.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

FORMAT = "prefixkv-profile"
VERSION = 2
READABLE_VERSIONS = (1, VERSION)  # version 1: the costs under provenance
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
class LayerCosts:
    """A loss calibration's measurement: ``kl_per_layer[i][j]``, compressed layer ``i`` kept at ``ratios[j]``."""

    ratios: tuple[float, ...]  # strictly increasing in (0, 1); 1.0 (cost 0) is implied
    kl_per_layer: tuple[tuple[float, ...], ...]  # one row per compressed layer, one column per ratio

    def __post_init__(self):
        object.__setattr__(self, "ratios", tuple(float(r) for r in self.ratios))
        object.__setattr__(self, "kl_per_layer", tuple(tuple(float(c) for c in row) for row in self.kl_per_layer))
        if any(len(row) != len(self.ratios) for row in self.kl_per_layer):
            raise ProfileError(f"profile costs must have one value per ratio ({len(self.ratios)}) in every layer's row")

    def to_json(self) -> dict[str, Any]:
        return {"ratios": list(self.ratios), "kl_per_layer": [list(row) for row in self.kl_per_layer]}


@dataclass(frozen=True)
class Profile:
    model: ModelIdentity
    scorer: str
    entries: dict[float, tuple[float, ...]]  # budget -> per-layer keep ratios
    provenance: dict[str, Any] = field(default_factory=dict)  # how it was made; never read to serve
    costs: LayerCosts | None = None  # a loss profile's: they serve every budget

    def __post_init__(self):
        if not self.entries:
            raise ProfileError("profile has no entries")
        for budget, ratios in self.entries.items():
            _check_entry(budget, ratios, self.model.num_layers)
        if self.costs is not None and len(self.costs.kl_per_layer) != self.model.num_layers:
            raise ProfileError(f"profile costs cover {len(self.costs.kl_per_layer)} layers, not {self.model.num_layers}")

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
        if self.costs is None:
            return None
        import torch

        from .costs import allocation_curves

        try:
            return allocation_curves(self.costs.ratios, torch.tensor(self.costs.kl_per_layer, dtype=torch.float64))
        except ValueError as exc:  # ratios or costs out of range
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
            "costs": None if self.costs is None else self.costs.to_json(),
            "provenance": self.provenance,
        }

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def from_json(cls, data: Any) -> "Profile":
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ProfileError(f"not a PrefixKV profile (expected \"format\": \"{FORMAT}\")")
        version = data.get("version")
        if isinstance(version, bool) or version not in READABLE_VERSIONS:
            readable = " and ".join(str(v) for v in READABLE_VERSIONS)
            raise ProfileError(f"unsupported profile version {version!r} (this build reads {readable})")
        try:
            if version == 1:
                data = _from_v1(data)
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
            costs = data.get("costs")
            if costs is not None:
                costs = LayerCosts(costs["ratios"], costs["kl_per_layer"])
            return cls(model, str(data["scorer"]), entries, dict(data.get("provenance", {})), costs)
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


def _from_v1(data: dict[str, Any]) -> dict[str, Any]:
    """A version 1 profile as version 2: a loss profile's costs move from ``provenance`` to ``costs``."""
    provenance = dict(data.get("provenance", {}))
    costs = None
    if "kl_per_layer" in provenance:
        costs = {"kl_per_layer": provenance.pop("kl_per_layer"), "ratios": provenance.pop("loss_ratios")}
    return {**data, "version": 2, "costs": costs, "provenance": provenance}


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
