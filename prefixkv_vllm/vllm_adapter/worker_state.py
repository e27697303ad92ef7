"""Worker-process state shared by the attention backends.

vLLM hands attention-metadata builders no prompt lengths or request ids. The
plugin wraps the model runner's metadata construction to publish them here for
the duration of each step (``current_batch``), and keeps the importance scores
that a prompt accumulates over its prefill chunks (``ScoreStore``).
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ..policy import KVPolicy, build_policy
from .config import PrefixKVConfig


@dataclass(frozen=True)
class BatchInfo:
    """Rows of this step's batch, in the order of the attention metadata."""

    req_ids: list[str]
    prompt_lens: np.ndarray  # int64 [num_reqs]
    request_budgets: np.ndarray | None = None  # float [num_reqs]: a request's own kv_budget, NaN for the server's


_local = threading.local()


@contextlib.contextmanager
def publish_batch(batch: BatchInfo) -> Iterator[None]:
    previous = getattr(_local, "batch", None)
    _local.batch = batch
    try:
        yield
    finally:
        _local.batch = previous


def current_batch() -> BatchInfo | None:
    return getattr(_local, "batch", None)


class ScoreStore:
    """Accumulated attention ``[Hkv, P]`` per (request, layer) until the prompt is compacted.

    The model runner's state update reports finished and preempted requests
    (``plugin``), which are dropped here.
    """

    def __init__(self) -> None:
        self._scores: dict[str, dict[str, torch.Tensor]] = {}

    def get(self, req_id: str, layer_name: str, num_kv_heads: int, prompt_len: int, device) -> torch.Tensor:
        layers = self._scores.setdefault(req_id, {})
        scores = layers.get(layer_name)
        if scores is None or scores.shape != (num_kv_heads, prompt_len):
            scores = layers[layer_name] = torch.zeros(num_kv_heads, prompt_len, dtype=torch.float32, device=device)
        return scores

    def pop(self, req_id: str, layer_name: str) -> torch.Tensor | None:
        layers = self._scores.get(req_id)
        if layers is None:
            return None
        scores = layers.pop(layer_name, None)
        if not layers:
            del self._scores[req_id]
        return scores

    def drop(self, req_ids) -> None:
        """Forget requests that finished, were aborted or were preempted.

        Only those: a request left out of one step (a partial prefill that got no
        tokens under the token or encoder budget) resumes its prompt later and needs
        what it accumulated so far.
        """
        for req_id in req_ids:
            self._scores.pop(req_id, None)

    def __len__(self) -> int:
        return len(self._scores)


SCORES = ScoreStore()


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
