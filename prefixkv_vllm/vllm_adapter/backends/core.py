"""What every PrefixKV attention backend does, whatever its stock kernel.

Per KV-cache group and step, ``plan_step`` (called by the metadata builder, with
the model runner's ``worker_state.WorkerState``)
derives from the lengths, through ``policy.paged.live_blocks`` (the layout
contract shared with the scheduler):

* the effective view of every request: its live run of blocks (the freed prefix
  cut off the block table) and its shortened length, so attention never reads a
  freed block;
* which queries to score this step: prompt queries (chunked prefill accumulates)
  and, with ``scored`` decoding, the last decode queries before a round;
* which requests' runs move after this step (the prompt finishes, or a decode
  round comes), and so get compacted.

``after_attention`` (called by the attention impl, per layer, after the stock
kernel ran) scores, and selects what the compacting rows keep; the moves of every
layer wait in the runner's ``worker_state.PendingMoves``, which the model-runner
hook launches as one ``ops.compact`` once the model's forward is done. Both only
prepare and call the ``torch.ops.prefixkv`` ops, which exist for CPU and CUDA.

``PrefixKVBuilderMixin`` and ``PrefixKVImplMixin`` wrap a stock backend's
builder and impl with these two steps; a backend file only says how to view
its cache as paged keys and values (``ops.reference``: ``[num_blocks,
block_size, Hkv, D]`` or its tiled form, in the cache's own dtype, fp8 included).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from ... import ops
from ...config import PrefixKVConfig
from ...policy import KVPolicy, Protection, select_tokens
from ...policy.paged import PagedLayout, kept_prompt_blocks, live_blocks
from ..kv_spec import PrefixKVAttentionSpec
from ..worker_state import BatchInfo, LayerMove, WorkerState, policy_for


@dataclass
class ScoreWork:
    """Queries to score this step, packed as a sub-batch of the step's queries.

    Keys are read through each row's effective (live-run) block table, so a row's
    queries are the last ones of ``seq_lens`` effective tokens.
    """

    rows: list[int]
    token_index: torch.Tensor  # [T'] positions in the step's query tensor
    query_start_loc: torch.Tensor  # [B' + 1] int32
    seq_lens: torch.Tensor  # [B'] int32 effective key counts (prompt rows: truncated at the prompt end)
    block_table: torch.Tensor  # [B', max_blocks] int32 effective rows
    min_query_pos: torch.Tensor  # [B'] int32
    used_at: list[int]  # processed-token count of the compaction the scores are for
    sizes: list[int]  # keys scored (the score tensor's length)
    fresh: list[bool]  # first queries for that compaction: start from zero


@dataclass
class CompactWork:
    """Rows whose live run moves forward after this step (``policy.paged``)."""

    rows: list[int]
    computed: list[int]  # processed tokens before the step
    processed: list[int]  # and after it
    start_before: list[int]
    start_after: list[int]
    end_after: list[int]
    # Kept tokens go to [write_start, end_after); the run's blocks before it are a
    # write-once shared prefix (prefix caching, ``policy.paged``) and stay whole.
    write_start: list[int]
    block_table: torch.Tensor  # [R, max_blocks] int32, full rows (logical block indices)


@dataclass
class StepWork:
    """Attached to the group's attention metadata for ``after_attention``."""

    policy: KVPolicy
    layout: PagedLayout
    state: WorkerState  # the model runner's: its request store, pending moves and rank mean
    req_ids: list[str]
    prompt_lens: list[int]
    kept_prompt_blocks: list[int]
    score: ScoreWork | None
    compact: CompactWork | None


@dataclass
class StepPlan:
    seq_lens: torch.Tensor
    seq_lens_cpu: torch.Tensor
    block_table: torch.Tensor
    max_seq_len: int
    work: StepWork | None


def row_ratios(spec: PrefixKVAttentionSpec, request_budgets: np.ndarray) -> np.ndarray:
    """The layer's keep ratio for each row (NaN budget: the server's)."""
    ratios = np.full(request_budgets.shape, spec.keep_ratio)
    for row in np.flatnonzero(~np.isnan(request_budgets)):
        ratios[row] = spec.request_ratio(float(request_budgets[row]))
    return ratios


def _rows(spec: PrefixKVAttentionSpec, batch: BatchInfo, num_reqs: int):
    """Prompt lengths and ratios of the step's rows; rows without a request keep everything."""
    known = min(num_reqs, len(batch.req_ids))
    prompt_lens = np.zeros(num_reqs, dtype=np.int64)
    prompt_lens[:known] = batch.prompt_lens[:known]
    budgets = np.full(num_reqs, np.nan)
    if batch.request_budgets is not None:
        budgets[:known] = batch.request_budgets[:known]
    ratios = np.ones(num_reqs)
    ratios[:known] = row_ratios(spec, budgets[:known])
    return known, prompt_lens, ratios


def live_starts(spec: PrefixKVAttentionSpec, batch: BatchInfo, computed: np.ndarray) -> np.ndarray:
    """Each row's live-run start for ``computed`` processed tokens (the blocks this step reads)."""
    _, prompt_lens, ratios = _rows(spec, batch, len(computed))
    start, _ = live_blocks(prompt_lens, computed, ratios, spec.layout)
    return np.asarray(start, dtype=np.int64)


def publish_device_starts(batch: BatchInfo, specs, computed: np.ndarray, device) -> BatchInfo:
    """Every PrefixKV group's starts in one (pinned, on CUDA) host-to-device copy for the step."""
    settings = list(dict.fromkeys(spec.prefixkv_settings for spec in specs if isinstance(spec, PrefixKVAttentionSpec)))
    if not settings or len(computed) == 0:
        return batch
    by_settings = {spec.prefixkv_settings: spec for spec in specs if isinstance(spec, PrefixKVAttentionSpec)}
    starts = np.stack([live_starts(by_settings[k], batch, computed) for k in settings])
    host = torch.from_numpy(starts.astype(np.int32))
    if torch.device(device).type == "cuda":
        host = host.pin_memory()
    on_device = host.to(device, non_blocking=True)
    return dataclasses.replace(batch, device_starts={k: (starts[i], on_device[i]) for i, k in enumerate(settings)})


def plan_step(
    spec: PrefixKVAttentionSpec,
    policy: KVPolicy,
    state: WorkerState,
    query_start_loc_cpu: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens_cpu: torch.Tensor | None,
    decode_window: int,
) -> StepPlan | None:
    """The group's effective metadata and this step's work, or ``None`` when nothing changes.

    ``seq_lens_cpu`` is the host copy of ``seq_lens`` (vLLM's ``seq_lens_cpu_upper_bound``,
    exact without speculative decoding, which start-up rejects); without it the lengths
    are read from the device, a synchronisation on GPUs.
    """
    num_reqs = seq_lens.shape[0]
    batch = state.batch
    if batch is None or num_reqs == 0:
        return None
    rows = step_rows(spec, batch, query_start_loc_cpu, seq_lens if seq_lens_cpu is None else seq_lens_cpu, num_reqs)
    if rows is None:
        return None
    # A (re)started request: nothing from an earlier life applies.
    state.store.drop([batch.req_ids[row] for row in np.flatnonzero(rows.computed[: rows.known] == 0)])
    known = rows.known
    compact_rows = [int(r) for r in np.flatnonzero(rows.start_after[:known] > rows.start_before[:known])]
    score_rows = _score_rows(rows, policy, spec.layout, decode_window)
    if not rows.start_before.any() and not score_rows and not compact_rows:
        return None
    effective_seq_lens, effective_table = _effective_view(spec, batch, rows, seq_lens, block_table)
    work = None
    if score_rows or compact_rows:
        work = StepWork(
            policy=policy,
            layout=spec.layout,
            state=state,
            req_ids=batch.req_ids[:known],
            prompt_lens=[int(p) for p in rows.prompt_lens[:known]],
            kept_prompt_blocks=[int(k) for k in rows.kept[:known]],
            score=_score_work(score_rows, rows, spec.layout.block_size, effective_table) if score_rows else None,
            compact=_compact_work(spec, batch, rows, compact_rows, block_table) if compact_rows else None,
        )
    effective_seq_lens_cpu = rows.seq_lens - rows.start_before * spec.layout.block_size
    return StepPlan(
        effective_seq_lens,
        torch.from_numpy(effective_seq_lens_cpu).to(torch.int32),
        effective_table,
        int(effective_seq_lens_cpu.max()),
        work,
    )


@dataclass
class StepRows:
    """The step's rows on the host: lengths, and each row's live run before and after the step.

    Rows past ``known`` (padding the runner added) have no request: they keep everything.
    """

    known: int
    prompt_lens: np.ndarray
    ratios: np.ndarray
    query_starts: np.ndarray  # [num_reqs + 1] offsets in the step's query tensor
    computed: np.ndarray  # processed tokens before the step
    seq_lens: np.ndarray  # and after it
    start_before: np.ndarray  # live-run start (block) the step reads
    start_after: np.ndarray  # and the one after it
    end_after: np.ndarray
    kept: np.ndarray  # kept prompt blocks


def step_rows(spec: PrefixKVAttentionSpec, batch: BatchInfo, query_start_loc_cpu, seq_lens_cpu, num_reqs: int) -> StepRows | None:
    """``None`` when every row keeps its whole cache (nothing for this group to do)."""
    known, prompt_lens, ratios = _rows(spec, batch, num_reqs)
    if (ratios[:known] >= 1.0).all():
        return None
    layout = spec.layout
    seq_host = seq_lens_cpu[:num_reqs].cpu().numpy().astype(np.int64)
    starts = query_start_loc_cpu[: num_reqs + 1].numpy().astype(np.int64)
    computed = seq_host - (starts[1:] - starts[:-1])
    # Before and after the step in one call: this runs for every group at every step.
    run_starts, run_ends = live_blocks(np.tile(prompt_lens, 2), np.concatenate([computed, seq_host]), np.tile(ratios, 2), layout)
    start_before, start_after = run_starts[:num_reqs].copy(), run_starts[num_reqs:].copy()
    start_before[known:] = start_after[known:] = 0
    kept = kept_prompt_blocks(prompt_lens, ratios, layout.block_size, layout.sink, layout.recent)
    return StepRows(known, prompt_lens, ratios, starts, computed, seq_host, start_before, start_after, run_ends[num_reqs:], kept)


def _effective_view(spec, batch: BatchInfo, rows: StepRows, seq_lens: torch.Tensor, block_table: torch.Tensor):
    """Each row's lengths and block table with the freed prefix of its run cut off (what attention reads)."""
    if not rows.start_before.any():
        return seq_lens, block_table
    num_reqs = seq_lens.shape[0]
    published = (batch.device_starts or {}).get(spec.prefixkv_settings)
    if published is not None and np.array_equal(published[0][:num_reqs], rows.start_before):
        device_starts = published[1]
    else:  # rows the runner's counts did not describe (e.g. padding): this group's own copy
        device_starts = torch.from_numpy(rows.start_before.astype(np.int32)).to(block_table.device)
    shift = device_starts[:num_reqs].to(block_table.dtype)
    columns = torch.arange(block_table.shape[1], device=block_table.device)[None, :]
    source = (columns + shift[:, None]).clamp(max=block_table.shape[1] - 1)
    return seq_lens - (shift * spec.layout.block_size).to(seq_lens.dtype), block_table.gather(1, source)


def _compact_work(spec, batch: BatchInfo, rows: StepRows, compact_rows: list[int], block_table: torch.Tensor) -> CompactWork:
    def at(values):
        return [int(values[r]) for r in compact_rows]

    write_start = [
        _write_start(spec, batch, r, int(rows.prompt_lens[r]), int(rows.start_after[r]), int(rows.end_after[r])) for r in compact_rows
    ]
    return CompactWork(
        compact_rows, at(rows.computed), at(rows.seq_lens), at(rows.start_before), at(rows.start_after), at(rows.end_after),
        write_start, block_table[compact_rows],
    )  # fmt: skip


def _write_start(spec: PrefixKVAttentionSpec, batch: BatchInfo, row: int, prompt_len: int, start: int, end: int) -> int:
    """First block a moving run may write: past the request's write-once prefix, inside ``[start, end]``."""
    if not spec.prefix_caching:
        return start
    budget = None if batch.request_budgets is None else float(batch.request_budgets[row])
    shared = spec.shared_blocks(prompt_len, None if budget is None or np.isnan(budget) else budget)
    return end if shared is None else min(max(start, shared), end)


class ScoreRow(NamedTuple):
    """A row whose queries ``[first, last)`` (positions) are scored this step, for the compaction at ``used_at``."""

    row: int
    first: int
    last: int
    used_at: int  # processed-token count of the compaction the scores are for
    min_query_pos: int
    fresh: bool  # the first queries for that compaction: start from zero


def _score_rows(rows: StepRows, policy: KVPolicy, layout: PagedLayout, decode_window: int) -> list[ScoreRow]:
    """The rows scored this step, by row.

    Prompt rows score their prompt queries (from the scorer's first query on) for
    the prompt compaction; with ``scored`` decoding, decode rows score the last
    ``decode_window`` queries before the round that will move their run. Vectorised
    over rows: this runs for every group at every step.
    """
    known = rows.known
    prompt_lens, computed, seq_host = rows.prompt_lens[:known], rows.computed[:known], rows.seq_lens[:known]
    scored = []
    if policy.scorer.needs_attention and (computed < prompt_lens).any():
        first_query = np.array([policy.scorer.min_query_pos(int(p)) for p in prompt_lens], dtype=np.int64)
        first = np.maximum(computed, first_query)
        last = np.minimum(seq_host, prompt_lens)
        # Rows still in their prompt, with prompt blocks to evict and window queries this step.
        prompt_rows = (computed < prompt_lens) & (rows.kept[:known] < prompt_lens // layout.block_size) & (last > first)
        scored += [
            ScoreRow(int(r), int(first[r]), int(last[r]), int(prompt_lens[r]), int(first_query[r]), bool(computed[r] == 0))
            for r in np.flatnonzero(prompt_rows)
        ]
    if layout.decode == "scored":
        interval = layout.interval
        decoding = computed >= prompt_lens
        upcoming = prompt_lens + ((computed - prompt_lens) // interval + 1) * interval
        target = np.where(seq_host >= upcoming, prompt_lens + (seq_host - prompt_lens) // interval * interval, upcoming)
        moves = live_blocks(prompt_lens, target, rows.ratios[:known], layout)[0] > rows.start_before[:known]
        first, last = np.maximum(computed, target - decode_window), np.minimum(seq_host, target)
        scored += [
            ScoreRow(int(r), int(first[r]), int(last[r]), int(target[r]), 0, bool(computed[r] <= target[r] - decode_window))
            for r in np.flatnonzero(decoding & moves & (last > first))
        ]
    return sorted(scored)


def _score_work(scored: list[ScoreRow], rows: StepRows, block_size: int, effective_table) -> ScoreWork:
    token_index, query_start_loc, key_lens, min_pos = [], [0], [], []
    for s in scored:
        offset = int(rows.start_before[s.row]) * block_size
        begin = int(rows.query_starts[s.row]) + s.first - int(rows.computed[s.row])
        token_index.append(torch.arange(begin, begin + s.last - s.first))
        query_start_loc.append(query_start_loc[-1] + s.last - s.first)
        key_lens.append(s.last - offset)
        min_pos.append(max(0, s.min_query_pos - offset))
    device = effective_table.device
    as_int32 = lambda values: torch.tensor(values, dtype=torch.int32).to(device)  # noqa: E731
    return ScoreWork(
        rows=[s.row for s in scored],
        token_index=torch.cat(token_index).to(device),
        query_start_loc=as_int32(query_start_loc),
        seq_lens=as_int32(key_lens),
        block_table=effective_table[[s.row for s in scored]],
        min_query_pos=as_int32(min_pos),
        used_at=[s.used_at for s in scored],
        sizes=[s.used_at - int(rows.start_before[s.row]) * block_size for s in scored],
        fresh=[s.fresh for s in scored],
    )


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point and dtype.itemsize == 1


@dataclass(frozen=True)
class Scales:
    """How to read the layer's attention inputs: its softmax scale, and the scales of
    fp8 keys (stored as ``key / k``) and of fp8 queries (FlashAttention can quantize them)."""

    softmax: float
    k: float = 1.0
    q: float = 1.0


def after_attention(
    work: StepWork,
    layer_name: str,
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    scales: Scales,
) -> None:
    """Score this step's queries, then select the kept tokens of the rows whose layout moves (moved at the step's end).

    ``key_cache``/``value_cache`` are paged views (``ops.reference``).
    """
    num_kv_heads = ops.paged_shape(key_cache)[2]
    if work.score is not None:
        _accumulate_scores(work, layer_name, query, key_cache, scales, num_kv_heads)
    if work.compact is not None:
        _compact(work, layer_name, key_cache, value_cache, num_kv_heads)


def _accumulate_scores(work, layer_name, query, key_cache, scales, num_kv_heads):
    score = work.score
    chunk = torch.zeros(len(score.rows), num_kv_heads, max(score.sizes), dtype=torch.float32, device=query.device)
    scored = query.index_select(0, score.token_index)
    if is_fp8(scored.dtype):  # the ops read float queries
        scored = scored.float() * scales.q
    ops.importance(
        scored,
        key_cache,
        score.block_table,
        score.query_start_loc,
        score.seq_lens,
        scales.softmax,
        chunk,
        min_query_pos=score.min_query_pos,
        k_scale=scales.k,
    )
    for index, row in enumerate(score.rows):
        size = score.sizes[index]
        stored = work.state.store.scores(
            work.req_ids[row], layer_name, score.used_at[index], (num_kv_heads, size), query.device, score.fresh[index]
        )
        stored.add_(chunk[index, :, :size])


# Priorities above any score or position: tokens a selection must keep.
_KEEP = float("inf")


def _compact(work, layer_name, key_cache, value_cache, num_kv_heads):
    """Select each moving row's kept tokens and write them into the last blocks of its new run.

    Three coordinates describe a moving row (block indices are columns of its block table)::

            before          after            write                end
              |    freed      |  write-once    |    rewritten       |
              [===============|================|====================]
        run slot 0 ....................................... (end - before) * bs
        op slots:  keep + ...                   0 ......... keep - 1

    * token positions: where a token sits in the request's sequence (``positions``);
    * run slots: ``(block - before) * bs + slot`` over the run ``[before, end)``; the
      candidates are the freed and the rewritten slots (the write-once blocks of a
      shared prefix, ``[after, write)``, stay in place and are kept);
    * op slots: indices into the block list handed to ``ops.compact``, ``[write, end)``
      first and the freed ``[before, after)`` after, so that the kept tokens, moved to
      the front in order (overlap-safe), fill ``[write, end)`` and the freed blocks hold
      nothing the request still needs.

    The move itself waits for the end of the step (``worker_state.PendingMoves``).
    """
    lists, selections = [], []
    for index, row in enumerate(work.compact.rows):
        selected = _select_row(work, layer_name, index, row, num_kv_heads, key_cache.device)
        if selected is not None:
            selections.append(selected[0])
            lists.append(selected[1])
    if selections:
        work.state.moves.add(LayerMove(key_cache, value_cache, selections, lists))


def _select_row(work, layer_name, index, row, num_kv_heads, device):
    """One row's kept tokens as increasing op slots and its op block list, or ``None`` when it writes nothing.

    Records the true positions of the row's kept tokens in slot order (``RequestStore.positions``).
    """
    compact, bs = work.compact, work.layout.block_size
    before, after, end = compact.start_before[index], compact.start_after[index], compact.end_after[index]
    write = compact.write_start[index]
    keep = (end - write) * bs
    moved = (after - before) * bs  # candidates in the freed blocks, first in run slots
    whole = slice(moved, (write - before) * bs)  # the write-once blocks, in run slots
    priority, positions = _priorities(
        work, layer_name, row, compact.computed[index], compact.processed[index], before, end, whole, num_kv_heads, device
    )
    heads = max(priority.shape[0], positions.shape[0])
    positions = positions.expand(heads, -1)
    kept_whole = positions[:, whole]
    req_id = work.req_ids[row]
    if keep == 0:
        work.state.store.set_positions(req_id, layer_name, kept_whole)
        return None
    # Candidates (run slots without the write-once ones): the freed slots, then the rewritten ones.
    priority = torch.cat([priority[:, : whole.start], priority[:, whole.stop :]], dim=1)
    positions = torch.cat([positions[:, : whole.start], positions[:, whole.stop :]], dim=1)
    chosen = select_tokens(priority.expand(heads, -1), keep, Protection(sink=0, recent=0))
    op_slots, order = torch.where(chosen >= moved, chosen - moved, chosen + keep).sort(dim=1)
    work.state.store.set_positions(req_id, layer_name, torch.cat([kept_whole, positions.gather(1, chosen.gather(1, order))], dim=1))
    table = compact.block_table[index]
    return op_slots, torch.cat([table[write:end], table[before:after]])


def _priorities(work, layer_name, row, computed, processed, before, end, whole, num_kv_heads, device):
    """Selection priorities ``[1 or Hkv, n]`` of a row's run slots ``[before, end)``, and their true positions.

    ``whole`` (run slots) are kept in place whatever their priority, so a prompt
    compaction counts them in its kept tokens. A prompt compaction ranks the prompt
    body by the scorer; a decode round by ``fifo`` or ``scored`` (``_decode_priorities``);
    a request resumed past a round (recompute after preemption) ranks its prompt by
    the scorer and its output by ``fifo``.
    """
    count = (end - before) * work.layout.block_size
    natural = torch.arange(before * work.layout.block_size, before * work.layout.block_size + count, device=device)[None, :]
    if computed < work.prompt_lens[row]:  # the prompt compaction (and a resumed request's catch-up)
        return _prompt_priorities(work, layer_name, row, natural, whole, num_kv_heads), natural
    return _decode_priorities(work, layer_name, row, processed, natural)


def _prompt_priorities(work, layer_name, row, natural, whole, num_kv_heads):
    """The scorer's selection of the prompt body (sink and recent tokens protected) first, then the prompt's tail."""
    policy, bs = work.policy, work.layout.block_size
    req_id, prompt_len = work.req_ids[row], work.prompt_lens[row]
    body = (prompt_len // bs) * bs
    accumulated = work.state.store.take_scores(req_id, layer_name, prompt_len)
    if accumulated is None:  # recency needs no attention
        accumulated = torch.zeros(num_kv_heads, prompt_len, device=natural.device)
    scores = _shared_over_ranks(work, policy.scorer.scores(accumulated, prompt_len))[:, :body]
    protection = Protection(sink=policy.protection.sink, recent=max(0, policy.protection.recent - (prompt_len - body)))
    if whole.stop > whole.start:  # run slots are positions here: before is 0 while the prompt is compacted
        scores = scores.clone()
        scores[:, whole] = _KEEP
    chosen = select_tokens(scores, work.kept_prompt_blocks[row] * bs, protection)
    if natural.shape[1] == body:
        return _one_hot(chosen, body)
    priority = natural.to(torch.float32).expand(chosen.shape[0], -1).clone()
    priority[:, :body] = -_KEEP
    priority[:, body:prompt_len] = _KEEP
    return priority.scatter_(1, chosen, _KEEP)


def _decode_priorities(work, layer_name, row, processed, natural):
    """``fifo``: the compressed prompt, then the newest tokens; ``scored``: the attention of the last decode queries, sink protected."""
    policy, layout = work.policy, work.layout
    req_id, prompt_len = work.req_ids[row], work.prompt_lens[row]
    positions = work.state.store.positions(req_id, layer_name)
    if positions is None:
        positions = natural
    else:
        compressed = positions.shape[1]
        positions = torch.cat([positions, natural[:, compressed:].expand(positions.shape[0], -1)], dim=1)
    accumulated = None
    if layout.decode == "scored":
        at_round = prompt_len + (processed - prompt_len) // layout.interval * layout.interval
        accumulated = work.state.store.take_scores(req_id, layer_name, at_round)
    if accumulated is None:  # fifo, or no decode scores (a request resumed past a round)
        return torch.where(positions < prompt_len, _KEEP, positions.to(torch.float32)), positions
    count = natural.shape[1]
    scores = accumulated[:, :count]
    if not policy.scorer.per_kv_head:
        scores = _shared_over_ranks(work, scores.mean(dim=0, keepdim=True))
    return scores.masked_fill(positions < policy.protection.sink, _KEEP), positions


def _shared_over_ranks(work: StepWork, scores: torch.Tensor) -> torch.Tensor:
    """A selection shared by the heads (one score row) reads the heads of every tensor-parallel rank."""
    if work.policy.scorer.per_kv_head or work.state.mean_over_ranks is None:
        return scores  # per-head selections need only the rank's own heads
    return work.state.mean_over_ranks(scores)


def _one_hot(chosen: torch.Tensor, size: int) -> torch.Tensor:
    priority = torch.zeros(chosen.shape[0], size, device=chosen.device)
    return priority.scatter_(1, chosen, 1.0)


class PrefixKVBuilderMixin:
    """Gives the stock builder each group's effective lengths and block table, and attaches the step's work.

    ``metadata_cls`` is the backend's metadata dataclass extended with a
    ``prefixkv: StepWork | None`` field. ``prefixkv_state`` is the model runner's
    PrefixKV state, handed over by the model-runner hook once the KV cache exists;
    without it (and without a policy) the builder is vLLM's.
    """

    metadata_cls: type

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        config = PrefixKVConfig.from_additional_config(vllm_config.additional_config)
        self.prefixkv_policy = policy_for(config)
        self.prefixkv_decode_window = config.window
        self.prefixkv_state: WorkerState | None = None

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
        spec = self.kv_cache_spec
        plan = None
        if isinstance(spec, PrefixKVAttentionSpec) and self.prefixkv_policy is not None and self.prefixkv_state is not None:
            plan = plan_step(
                spec,
                self.prefixkv_policy,
                self.prefixkv_state,
                common_attn_metadata.query_start_loc_cpu,
                common_attn_metadata.seq_lens,
                common_attn_metadata.block_table_tensor,
                common_attn_metadata.seq_lens_cpu_upper_bound,
                self.prefixkv_decode_window,
            )
        if plan is None:
            return super().build(common_prefix_len, common_attn_metadata, fast_build)
        effective = common_attn_metadata.replace(
            seq_lens=plan.seq_lens,
            seq_lens_cpu_upper_bound=None if common_attn_metadata.seq_lens_cpu_upper_bound is None else plan.seq_lens_cpu,
            block_table_tensor=plan.block_table,
            max_seq_len=plan.max_seq_len,
        )
        metadata = super().build(common_prefix_len, effective, fast_build)
        stock_fields = {f.name: getattr(metadata, f.name) for f in dataclasses.fields(metadata)}
        return self.metadata_cls(**stock_fields, prefixkv=plan.work)


class PrefixKVImplMixin:
    """Runs the stock attention, then scores and compacts the layer's cache."""

    def paged_views(self, layer, kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's cache as paged key and value views (``ops.reference``), in its stored dtype."""
        raise NotImplementedError

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
        output = super().forward(layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
        work = getattr(attn_metadata, "prefixkv", None)
        if work is not None:
            key_cache, value_cache = self.paged_views(layer, kv_cache)
            scales = Scales(self.scale)
            if is_fp8(key_cache.dtype):  # vLLM's per-layer scales
                scales = Scales(self.scale, k=layer._k_scale_float, q=layer._q_scale_float)
            num_tokens = attn_metadata.num_actual_tokens
            after_attention(work, layer.layer_name, query[:num_tokens], key_cache, value_cache, scales)
        return output
