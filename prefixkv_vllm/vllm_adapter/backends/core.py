"""What every PrefixKV attention backend does, whatever its stock kernel.

Per KV-cache group and step, ``plan_step`` (called by the metadata builder)
derives from the prompt lengths:

* the effective view of requests whose prompt was compacted in an earlier step:
  their freed prompt blocks are cut out of the block table and their lengths
  shortened, so attention never reads a freed block;
* which prompt queries to score this step (chunked prefill accumulates);
* which requests finish their prompt this step and get compacted.

``after_attention`` (called by the attention impl, per layer, after the stock
kernel ran on the full prompt) scores and compacts. Both only prepare and call
the ``torch.ops.prefixkv`` ops, which exist for CPU and CUDA.

``PrefixKVBuilderMixin`` and ``PrefixKVImplMixin`` wrap a stock backend's
builder and impl with these two steps; a backend file only says how to view
its cache as ``[num_blocks, block_size, Hkv, D]`` keys and values.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from ... import ops
from ...policy import KVPolicy, Protection, select_tokens
from ..config import PrefixKVConfig
from ..kv_spec import PrefixKVAttentionSpec
from ..worker_state import SCORES, BatchInfo, current_batch, policy_for


@dataclass
class ScoreWork:
    """Prompt queries to score this step, packed as a sub-batch of the step's queries."""

    rows: list[int]
    token_index: torch.Tensor  # [T'] positions in the step's query tensor
    query_start_loc: torch.Tensor  # [B' + 1] int32
    seq_lens: torch.Tensor  # [B'] int32, truncated at the prompt end
    block_table: torch.Tensor  # [B', max_blocks] int32, full (uncompacted) rows
    min_query_pos: torch.Tensor  # [B'] int32
    fresh: list[bool]  # first chunk of the prompt: start from zero


@dataclass
class CompactWork:
    rows: list[int]
    kept_blocks: list[int]
    block_table: torch.Tensor  # [R, max_blocks] int32


@dataclass
class StepWork:
    """Attached to the group's attention metadata for ``after_attention``."""

    policy: KVPolicy
    block_size: int
    req_ids: list[str]
    prompt_lens: list[int]
    score: ScoreWork | None
    compact: CompactWork | None


@dataclass
class StepPlan:
    seq_lens: torch.Tensor
    seq_lens_cpu: torch.Tensor
    block_table: torch.Tensor
    max_seq_len: int
    work: StepWork | None


def plan_step(
    spec: PrefixKVAttentionSpec,
    policy: KVPolicy,
    batch: BatchInfo | None,
    query_start_loc_cpu: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens_cpu: torch.Tensor | None = None,
) -> StepPlan | None:
    """The group's effective metadata and this step's work, or ``None`` when nothing changes.

    ``seq_lens_cpu`` is the host copy of ``seq_lens`` (vLLM's ``seq_lens_cpu_upper_bound``,
    exact without speculative decoding, which start-up rejects); without it the lengths
    are read from the device, a synchronisation on GPUs.
    """
    num_reqs = seq_lens.shape[0]
    if batch is None or num_reqs == 0:
        return None
    known = min(num_reqs, len(batch.req_ids))
    request_budgets = np.full(num_reqs, np.nan)
    if batch.request_budgets is not None:
        request_budgets[:known] = batch.request_budgets[:known]
    if spec.keep_ratio >= 1.0 and not (request_budgets < 1.0).any():
        return None
    block_size = spec.block_size
    prompt_lens = np.full(num_reqs, np.iinfo(np.int64).max, dtype=np.int64)  # rows without a request (dummy runs)
    prompt_lens[:known] = batch.prompt_lens[:known]
    if seq_lens_cpu is None:
        seq_lens_cpu = seq_lens.cpu()
    seq_lens_cpu = seq_lens_cpu[:num_reqs].numpy().astype(np.int64)
    starts = query_start_loc_cpu[: num_reqs + 1].numpy().astype(np.int64)
    query_lens = starts[1:] - starts[:-1]
    computed_before = seq_lens_cpu - query_lens

    full_blocks = np.where(prompt_lens < np.iinfo(np.int64).max, prompt_lens // block_size, 0)
    kept = np.array(
        [
            spec.kept_blocks(int(p), None if np.isnan(budget) else float(budget)) if f else 0
            for p, f, budget in zip(prompt_lens, full_blocks, request_budgets)
        ],
        dtype=np.int64,
    )
    gap = np.where(computed_before >= prompt_lens, full_blocks - kept, 0)

    score_rows, compact_rows = [], []
    for row in range(known):
        prompt_len = int(prompt_lens[row])
        if full_blocks[row] == kept[row]:
            continue  # nothing to evict: short prompt, or the ratio keeps every block
        chunk_begin, chunk_end = int(computed_before[row]), int(seq_lens_cpu[row])
        if chunk_begin < prompt_len and policy.scorer.needs_attention:
            if min(chunk_end, prompt_len) > max(chunk_begin, policy.scorer.min_query_pos(prompt_len)):
                score_rows.append(row)
        if chunk_begin < prompt_len <= chunk_end:
            compact_rows.append(row)
    if not gap.any() and not score_rows and not compact_rows:
        return None

    effective_seq_lens, effective_table = seq_lens, block_table
    if gap.any():
        gap_t = torch.from_numpy(gap).to(block_table.device)
        kept_t = torch.from_numpy(kept).to(block_table.device)
        columns = torch.arange(block_table.shape[1], device=block_table.device)[None, :]
        source = torch.where(columns >= kept_t[:, None], columns + gap_t[:, None], columns)
        effective_table = block_table.gather(1, source.clamp(max=block_table.shape[1] - 1))
        effective_seq_lens = (seq_lens - (gap_t * block_size).to(seq_lens.dtype)).to(seq_lens.dtype)

    work = None
    if score_rows or compact_rows:
        work = StepWork(
            policy=policy,
            block_size=block_size,
            req_ids=batch.req_ids[:known],
            prompt_lens=[int(p) for p in prompt_lens[:known]],
            score=_score_work(score_rows, starts, computed_before, seq_lens_cpu, prompt_lens, policy, block_table)
            if score_rows
            else None,
            compact=CompactWork(compact_rows, [int(kept[r]) for r in compact_rows], block_table[compact_rows])
            if compact_rows
            else None,
        )
    effective_seq_lens_cpu = seq_lens_cpu - gap * block_size
    return StepPlan(
        effective_seq_lens,
        torch.from_numpy(effective_seq_lens_cpu).to(torch.int32),
        effective_table,
        int(effective_seq_lens_cpu.max()),
        work,
    )


def _score_work(rows, starts, computed_before, seq_lens, prompt_lens, policy, block_table) -> ScoreWork:
    token_index, query_start_loc, truncated, min_pos, fresh = [], [0], [], [], []
    for row in rows:
        prompt_end = min(int(seq_lens[row]), int(prompt_lens[row]))  # resumed requests run past the prompt
        num_queries = prompt_end - int(computed_before[row])
        token_index.append(torch.arange(int(starts[row]), int(starts[row]) + num_queries))
        query_start_loc.append(query_start_loc[-1] + num_queries)
        truncated.append(prompt_end)
        min_pos.append(policy.scorer.min_query_pos(int(prompt_lens[row])))
        fresh.append(int(computed_before[row]) == 0)
    device = block_table.device
    as_int32 = lambda values: torch.tensor(values, dtype=torch.int32, device=device)  # noqa: E731
    return ScoreWork(
        rows=rows,
        token_index=torch.cat(token_index).to(device),
        query_start_loc=as_int32(query_start_loc),
        seq_lens=as_int32(truncated),
        block_table=block_table[rows],
        min_query_pos=as_int32(min_pos),
        fresh=fresh,
    )


def after_attention(
    work: StepWork,
    layer_name: str,
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    scale: float,
) -> None:
    """Score this step's prompt queries, then compact the prompts that just finished.

    ``key_cache``/``value_cache`` are ``[num_blocks, block_size, Hkv, D]`` views.
    """
    num_kv_heads = key_cache.shape[2]
    if work.score is not None:
        _accumulate_scores(work, layer_name, query, key_cache, scale, num_kv_heads)
    if work.compact is not None:
        _compact(work, layer_name, key_cache, value_cache, num_kv_heads)


def _accumulate_scores(work, layer_name, query, key_cache, scale, num_kv_heads):
    score = work.score
    prompt_lens = [work.prompt_lens[row] for row in score.rows]
    chunk = torch.zeros(len(score.rows), num_kv_heads, max(prompt_lens), dtype=torch.float32, device=query.device)
    ops.importance(
        query.index_select(0, score.token_index),
        key_cache,
        score.block_table,
        score.query_start_loc,
        score.seq_lens,
        scale,
        chunk,
        min_query_pos=score.min_query_pos,
    )
    for index, (row, fresh) in enumerate(zip(score.rows, score.fresh)):
        req_id, prompt_len = work.req_ids[row], work.prompt_lens[row]
        if fresh:
            SCORES.pop(req_id, layer_name)
        SCORES.get(req_id, layer_name, num_kv_heads, prompt_len, query.device).add_(chunk[index, :, :prompt_len])


def _compact(work, layer_name, key_cache, value_cache, num_kv_heads):
    compact = work.compact
    policy, block_size = work.policy, work.block_size
    selections = []
    for row, kept_blocks in zip(compact.rows, compact.kept_blocks):
        req_id, prompt_len = work.req_ids[row], work.prompt_lens[row]
        body = (prompt_len // block_size) * block_size  # the tail block stays in place
        accumulated = SCORES.pop(req_id, layer_name)
        if accumulated is None:  # recency needs no attention
            accumulated = torch.zeros(num_kv_heads, prompt_len, device=key_cache.device)
        scores = policy.scorer.scores(accumulated, prompt_len)[:, :body]
        protection = Protection(
            sink=policy.protection.sink, recent=max(0, policy.protection.recent - (prompt_len - body))
        )
        selections.append(select_tokens(scores, kept_blocks * block_size, protection))
    rows_per_request = max(s.shape[0] for s in selections)
    width = max(s.shape[1] for s in selections)
    keep_indices = torch.zeros(len(selections), rows_per_request, width, dtype=torch.int32, device=key_cache.device)
    for index, selection in enumerate(selections):
        keep_indices[index, : selection.shape[0], : selection.shape[1]] = selection.to(torch.int32)
    num_kept = torch.tensor([s.shape[1] for s in selections], dtype=torch.int32, device=key_cache.device)
    ops.compact(key_cache, value_cache, compact.block_table, keep_indices, num_kept)


class PrefixKVBuilderMixin:
    """Gives the stock builder each group's effective lengths and block table, and attaches the step's work.

    ``metadata_cls`` is the backend's metadata dataclass extended with a
    ``prefixkv: StepWork | None`` field.
    """

    metadata_cls: type

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.prefixkv_policy = policy_for(PrefixKVConfig.from_additional_config(vllm_config.additional_config))

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
        spec = self.kv_cache_spec
        plan = None
        if isinstance(spec, PrefixKVAttentionSpec) and self.prefixkv_policy is not None:
            plan = plan_step(
                spec,
                self.prefixkv_policy,
                current_batch(),
                common_attn_metadata.query_start_loc_cpu,
                common_attn_metadata.seq_lens,
                common_attn_metadata.block_table_tensor,
                seq_lens_cpu=common_attn_metadata.seq_lens_cpu_upper_bound,
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
    """Runs the stock attention, then scores and compacts the layer's prompt cache."""

    @staticmethod
    def token_major_views(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
        output = super().forward(layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
        work = getattr(attn_metadata, "prefixkv", None)
        if work is not None:
            key_cache, value_cache = self.token_major_views(kv_cache)
            num_tokens = attn_metadata.num_actual_tokens
            after_attention(work, layer.layer_name, query[:num_tokens], key_cache, value_cache, self.scale)
        return output
