"""Which paged-cache blocks each layer keeps, and when: the one contract the scheduler and the worker share.

The scheduler (which frees blocks) and the worker (which compacts and reads them)
never talk about a request. Both call the functions here with the same prompt
length ``P``, processed-token count ``c``, layer ratio and ``PagedLayout``, so
they agree by construction.

Invariants this relies on (vLLM 0.32, V1 engine):

1. vLLM writes token ``pos`` to logical block ``pos // block_size`` of the
   request's row and never refills a freed position; the worker's block table
   is append-only.
2. The scheduler frees on the *processed* token count, which never runs ahead of
   the worker's ``computed_before`` of the step that reads the blocks. So a block
   is freed only after the step that stopped reading it (and moved its kept
   tokens elsewhere) has run.
3. A layer's live blocks are always **one run** ``[live_start(c), ceil(c / bs))``:
   everything freed is a prefix of the row, as for vLLM's sliding window.
   ``live_start`` never decreases as ``c`` grows (tested).
4. Inside the run, the first ``compressed_end - live_start`` blocks are completely
   filled with kept tokens in any order (decode queries attend to every cached
   key, so order does not matter; kept keys carry their true RoPE positions);
   the blocks from ``compressed_end`` on hold the most recent tokens in place.
5. The layout changes only at the events below (the prompt's end, each decode
   round) and stands between them, so it is a function of the last event at or
   before ``c`` (``last_event``); the scheduler's managers free once per event.

How the run moves:

* **Prompt** (``c < P``): nothing is freed.
* **Prompt compacted** (``c >= P``): the ``kept_prompt_blocks`` best prompt blocks'
  worth of tokens are moved into the *last* kept blocks before the block holding
  the prompt's tail, so the freed blocks are a prefix. The tail block stays.
* **Decode rounds** (``decode != "off"``): every ``interval`` generated tokens
  (round ``k`` at ``c_k = P + k * interval``), the tokens before the last
  ``recent`` are re-selected down to ``round(ratio * c_k)`` tokens (never fewer
  than the compressed prompt) and moved into the last blocks of that region; the
  blocks before them are freed. So a layer holds about ``ratio`` of all tokens
  seen plus a bounded overhead: the last ``recent`` tokens, the block being
  written, and up to ``interval`` tokens generated since the last round.

With prefix caching (``prefix_caching``), a request's first ``shared_prefix_blocks``
blocks are **write-once**: no compaction of any layer writes into them, so their
content always matches the hash vLLM gives them, and only they may be hashed or
served as a cache hit (the scheduler caps both; ``kv_spec``). A moving run writes
its kept tokens into ``[max(start, shared), end)`` only; the blocks of the run
before the boundary stay in place, whole. The boundary is where a layer at the
request's mean budget starts keeping prompt blocks, so a layer at or below that
ratio compacts exactly as without prefix caching and only the layers above it
keep some recent shared blocks whole instead of the best-scored tokens. The run
(what is freed, and when) does not change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .costs import ratio_at

DECODE_MODES = ("off", "fifo", "scored")


@dataclass(frozen=True)
class PagedLayout:
    """The settings that fix a layer's block layout, besides its ratio."""

    block_size: int
    sink: int
    recent: int
    decode: str
    interval: int  # generated tokens between decode rounds, a multiple of block_size when rounds run
    prefix_caching: bool  # vLLM's prefix caching is on: keep a write-once prefix (see above)

    def __post_init__(self):
        if self.decode not in DECODE_MODES:
            raise ValueError(f"decode mode must be one of {', '.join(DECODE_MODES)}, got {self.decode!r}")
        if self.decode != "off" and (self.interval <= 0 or self.interval % self.block_size):
            raise ValueError(f"decode interval {self.interval} must be a positive multiple of the block size {self.block_size}")


def kept_prompt_blocks(prompt_len, keep_ratio, block_size: int, sink: int, recent: int):
    """Whole prompt blocks a layer keeps (the rest of ``prompt_len // block_size`` is freed).

    Works on scalars and on numpy arrays (broadcast).
    """
    prompt_len = np.asarray(prompt_len, dtype=np.int64)
    keep_ratio = np.asarray(keep_ratio, dtype=np.float64)
    full_blocks = prompt_len // block_size
    tail = prompt_len - full_blocks * block_size
    wanted = np.round((keep_ratio * prompt_len - tail) / block_size).astype(np.int64)
    # Protected tokens outside the tail must fit in the kept blocks.
    protected_in_body = np.minimum(sink, full_blocks * block_size) + np.maximum(0, recent - tail)
    needed = -(-protected_in_body // block_size)
    kept = np.minimum(full_blocks, np.maximum(wanted, needed))
    kept = np.where((keep_ratio >= 1.0) | (full_blocks == 0), full_blocks, kept)
    return kept if kept.ndim else int(kept)


def live_blocks(prompt_len, computed, keep_ratio, layout: PagedLayout):
    """``(live_start, compressed_end)`` of a layer once ``computed`` tokens are in its cache.

    Blocks before ``live_start`` are freed; ``[live_start, compressed_end)`` hold
    compacted kept tokens; blocks from ``compressed_end`` on hold recent tokens in
    place. Scalars or numpy arrays (broadcast).
    """
    bs = layout.block_size
    prompt_len = np.asarray(prompt_len, dtype=np.int64)
    computed = np.asarray(computed, dtype=np.int64)
    keep_ratio = np.asarray(keep_ratio, dtype=np.float64)
    full = prompt_len // bs
    kept = np.asarray(kept_prompt_blocks(prompt_len, keep_ratio, bs, layout.sink, layout.recent))
    prompt_start = full - kept
    start, end = np.where(computed >= prompt_len, prompt_start, 0), np.where(computed >= prompt_len, full, 0)
    if layout.decode != "off":
        rounds = np.maximum(computed - prompt_len, 0) // layout.interval
        at_round = prompt_len + rounds * layout.interval
        round_end = (at_round - layout.recent) // bs
        tail_blocks = -(-(prompt_len - full * bs) // bs)
        kept_at_round = np.maximum(kept + tail_blocks, np.round(keep_ratio * at_round / bs).astype(np.int64))
        round_start = round_end - kept_at_round
        # A round frees blocks only when it moves the run forward; otherwise the
        # previous layout stands (invariant 3: the start never goes back).
        moves = (rounds > 0) & (round_start > prompt_start)
        start = np.where(moves, round_start, start)
        end = np.where(moves, round_end, end)
    if start.ndim == 0:
        return int(start), int(end)
    return start, end


def last_event(prompt_len: int, computed: int, layout: PagedLayout) -> int:
    """The processed-token count at which the layout of ``computed`` tokens was last set (invariant 5)."""
    if computed < prompt_len:
        return 0
    if layout.decode == "off":
        return prompt_len
    return prompt_len + (computed - prompt_len) // layout.interval * layout.interval


def peak_live_blocks(prompt_len: int, final_len: int, keep_ratios: np.ndarray, layout: PagedLayout, prefill: bool = True) -> int:
    """Most blocks a request holds at once over all layers until ``final_len`` tokens.

    With ``prefill``, from admission: the prompt's peak is every layer holding the
    whole prompt. Either way, after the prompt the peak of each round interval is
    just before its next round (and before the scheduler frees on the step after,
    one more block per layer).
    """
    bs = layout.block_size
    ratios = np.asarray(keep_ratios, dtype=np.float64)[:, None]
    prefill_peak = len(ratios) * -(-prompt_len // bs) if prefill else 0
    if final_len <= prompt_len:
        return prefill_peak
    step = layout.interval if layout.decode != "off" else final_len - prompt_len
    points = np.arange(prompt_len, final_len, step, dtype=np.int64)[None, :]
    reached = np.minimum(points + step, final_len)
    start, _ = live_blocks(prompt_len, points, ratios, layout)
    held = (-(-reached // bs) + 1 - start).sum(axis=0)
    return int(max(prefill_peak, held.max()))


def shared_prefix_blocks(prompt_len: int, budget: float, layout: PagedLayout) -> int | None:
    """Leading blocks of a request that no layer ever rewrites, at its mean ``budget``; ``None``: all of them.

    Only these may be hashed for prefix caching or reused from the cache. At a
    budget of 1 nothing is ever compacted, so every block may be (stock vLLM).
    """
    if budget >= 1.0:
        return None
    full = prompt_len // layout.block_size
    return full - kept_prompt_blocks(prompt_len, budget, layout.block_size, layout.sink, layout.recent)


def request_keep_ratio(layer_ratio, server_budget: float, request_budget: float, curve=()):
    """A layer's ratio for a request with its own budget: the layers' mean moves from one budget to the other.

    With the layer's ``curve`` (``costs.allocation_curves``, from a loss profile), the
    ratio is the loss allocation's at the request's budget, as if the server ran at it;
    below the curve's first budget, that first allocation shrinks in proportion. Without
    one, the per-layer shape of the server's allocation is kept: below the server's
    budget every layer shrinks in proportion, above it every layer moves the same
    fraction of the way to 1. Either way a request budget of 1 keeps every layer whole,
    and the server's own budget gives ``layer_ratio`` exactly.
    """
    if math.isclose(request_budget, server_budget, rel_tol=0.0, abs_tol=1e-12):
        return layer_ratio
    if curve:
        (lowest, first_ratio) = curve[0]
        if request_budget < lowest:
            return first_ratio * request_budget / lowest
        return ratio_at(curve, request_budget)
    if request_budget <= server_budget:
        return layer_ratio * request_budget / server_budget
    return layer_ratio + (1.0 - layer_ratio) * (request_budget - server_budget) / (1.0 - server_budget)


def evicted_tokens(prompt_len: int, keep_ratio: float, block_size: int, sink: int, recent: int) -> int:
    """Prompt tokens a layer drops: the freed blocks, in tokens."""
    full_blocks = prompt_len // block_size
    return (full_blocks - kept_prompt_blocks(prompt_len, keep_ratio, block_size, sink, recent)) * block_size
