"""The model runner's PrefixKV state, handed to its attention backends.

vLLM hands attention-metadata builders no prompt lengths or request ids. The
model-runner hook (``hooks.model_runner``) owns one ``WorkerState`` per runner:
it sets the step's ``BatchInfo`` while the runner builds the attention metadata,
hands the state to every PrefixKV metadata builder once the KV cache exists, and
drops finished and preempted requests from its ``RequestStore``, which keeps what
a request's compactions need across steps, and moves the step's compactions
(``PendingMoves``) once the model's forward is done. Builders pass the whole state
on to the attention impl inside the step's work (``backends.core.StepWork``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence

from .. import ops
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


@dataclass(frozen=True)
class LayerMove:
    """One layer's compaction in a step: rows ``r`` keep ``selections[r]`` (``[1 or Hkv, n_r]``
    increasing op slots) of the block list ``tables[r]`` (``ops.reference.compact``)."""

    key_cache: torch.Tensor
    value_cache: torch.Tensor
    selections: list[torch.Tensor]
    tables: list[torch.Tensor]


# The CUDA op carries its layers' cache pointers in the kernel arguments: 128 at most
# (kMaxCompactLayers in csrc/cuda/launchers.h); a deeper step takes a call per 128 layers.
_MAX_LAYERS_PER_CALL = 128


class PendingMoves:
    """The step's compactions, every layer's, moved at the end of the model's forward by one
    ``ops.compact`` per cache layout (one in all for a model whose layers share a layout).

    Deferring a layer's move to the end of the step changes nothing it reads: attention has
    read the layer's cache when the layer adds its move, and no later layer of the step reads
    it; layers of another KV-cache group that share the raw tensor (hybrid models) own other
    blocks. What a move keeps is decided when it is added (the positions of its kept tokens
    are recorded then).
    """

    def __init__(self) -> None:
        self._moves: list[LayerMove] = []

    def add(self, move: LayerMove) -> None:
        self._moves.append(move)

    def flush(self) -> None:
        """Launch every pending move and forget them."""
        moves, self._moves = self._moves, []
        by_layout: dict[tuple, list[LayerMove]] = {}
        for move in moves:
            by_layout.setdefault(_layout_of(move), []).append(move)
        for same_layout in by_layout.values():
            for first in range(0, len(same_layout), _MAX_LAYERS_PER_CALL):
                _launch(same_layout[first : first + _MAX_LAYERS_PER_CALL])


def _layout_of(move: LayerMove) -> tuple:
    """What ``ops.compact`` requires its layers to share."""
    return tuple((c.shape, c.stride(), c.dtype, c.device) for c in (move.key_cache, move.value_cache))


def _launch(moves: list[LayerMove]) -> None:
    """One ``ops.compact`` call for every row of every layer: selections and block lists padded to a batch."""
    device = moves[0].key_cache.device
    selections = [s for move in moves for s in move.selections]
    heads = max(s.shape[0] for s in selections)
    # pad_sequence pads the first dim: selections go in as [n, heads], shared ones expanded to every head.
    keep_indices = pad_sequence([s.to(torch.int32).expand(heads, -1).T for s in selections], batch_first=True).transpose(1, 2)
    tables = pad_sequence([t.to(torch.int32) for move in moves for t in move.tables], batch_first=True)
    layers = [layer for layer, move in enumerate(moves) for _ in move.selections]
    counts = torch.tensor([layers, [s.shape[1] for s in selections]], dtype=torch.int32).to(device)  # one host-to-device copy
    ops.compact(
        [m.key_cache for m in moves], [m.value_cache for m in moves], counts[0], tables, keep_indices.contiguous(), counts[1]
    )


@dataclass
class WorkerState:
    """One model runner's PrefixKV state: the step being built, its pending compactions, and what requests keep across steps."""

    store: RequestStore = field(default_factory=RequestStore)
    moves: PendingMoves = field(default_factory=PendingMoves)
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
