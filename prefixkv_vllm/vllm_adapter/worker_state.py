"""The model runner's PrefixKV state, handed to its attention backends.

vLLM hands attention-metadata builders no prompt lengths or request ids. The
model-runner hook (``hooks.model_runner``) owns one ``WorkerState`` per runner:
it sets the step's ``BatchInfo`` while the runner builds the attention metadata,
hands the state to every PrefixKV metadata builder once the KV cache exists, and
drops finished and preempted requests from its ``RequestStore``, which keeps what
a request's compactions need across steps. Builders pass the store on to the
attention impl inside the step's work (``backends.core.StepWork``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ..config import PrefixKVConfig
from ..policy import KVPolicy, build_policy


@dataclass(frozen=True)
class BatchInfo:
    """Rows of this step's batch, in the order of the attention metadata."""

    req_ids: list[str]
    prompt_lens: np.ndarray  # int64 [num_reqs]
    request_budgets: np.ndarray | None = None  # float [num_reqs]: a request's own kv_budget, NaN for the server's
    # Each PrefixKV group's live-run start per row for this step, (host, device), keyed
    # by the spec's settings: one pinned host-to-device copy per step for all groups.
    device_starts: dict | None = None


class RequestStore:
    """Per (request, layer) state that outlives a step: accumulated attention and kept positions.

    * Scores ``[Hkv, n]`` accumulate over the steps whose queries a compaction
      reads (prompt chunks, or the last decode queries before a round); each is
      tagged with the processed-token count at which it will be used, so scores
      gathered for another round are never mistaken for these.
    * Positions ``[1 or Hkv, m]``: the true position of each token in a layer's
      compressed blocks, in slot order (compaction writes kept tokens in any
      order; ``fifo`` needs to know which are prompt tokens and which are newest).
    """

    def __init__(self) -> None:
        self._scores: dict[str, dict[str, tuple[int, torch.Tensor]]] = {}
        self._positions: dict[str, dict[str, torch.Tensor]] = {}

    def scores(self, req_id: str, layer_name: str, used_at: int, shape: tuple, device, fresh: bool) -> torch.Tensor:
        layers = self._scores.setdefault(req_id, {})
        tagged = layers.get(layer_name)
        if fresh or tagged is None or tagged[0] != used_at or tagged[1].shape != shape:
            tagged = layers[layer_name] = (used_at, torch.zeros(shape, dtype=torch.float32, device=device))
        return tagged[1]

    def take_scores(self, req_id: str, layer_name: str, used_at: int) -> torch.Tensor | None:
        layers = self._scores.get(req_id)
        tagged = layers.pop(layer_name, None) if layers else None
        if layers is not None and not layers:
            del self._scores[req_id]
        return tagged[1] if tagged is not None and tagged[0] == used_at else None

    def positions(self, req_id: str, layer_name: str) -> torch.Tensor | None:
        return self._positions.get(req_id, {}).get(layer_name)

    def set_positions(self, req_id: str, layer_name: str, positions: torch.Tensor) -> None:
        self._positions.setdefault(req_id, {})[layer_name] = positions

    def drop(self, req_ids) -> None:
        """Forget requests that finished, were aborted or were preempted (or restart from zero).

        Only those: a request left out of one step (a partial prefill that got no
        tokens under the token or encoder budget) resumes its prompt later and needs
        what it accumulated so far. The model runner's state update reports them
        (``plugin``).
        """
        for req_id in req_ids:
            self._scores.pop(req_id, None)
            self._positions.pop(req_id, None)

    def __len__(self) -> int:
        return len({*self._scores, *self._positions})


@dataclass
class WorkerState:
    """One model runner's PrefixKV state: the step being built, and what requests keep across steps."""

    store: RequestStore = field(default_factory=RequestStore)
    batch: BatchInfo | None = None  # set only while the runner builds the step's attention metadata
    # Averages a score row over the tensor-parallel ranks, each of which holds some of the KV
    # heads (None: one rank holds them all), so that a selection shared by the heads is the
    # same at every tensor-parallel size.
    mean_over_ranks: Callable[[torch.Tensor], torch.Tensor] | None = None


@functools.lru_cache(maxsize=8)
def policy_for(config: PrefixKVConfig) -> KVPolicy | None:
    """The token scorer and protection the worker uses (allocation is fixed per layer)."""
    return build_policy(
        config.policy,
        1.0,  # kept counts come from the layer's spec, not from a budget here
        scorer=config.scorer,
        per_kv_head=config.per_kv_head,
        window=config.window,
        sink=config.sink,
        recent=config.recent,
    )
