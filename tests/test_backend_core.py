"""The backend core without an engine: step plans, effective metadata, chunked scoring, compaction."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

pytest.importorskip("vllm")

import prefixkv_vllm.ops as ops  # noqa: E402
from prefixkv_vllm.ops import reference as ref  # noqa: E402
from prefixkv_vllm.policy.paged import kept_prompt_blocks  # noqa: E402
from prefixkv_vllm.vllm_adapter import worker_state  # noqa: E402
from prefixkv_vllm.vllm_adapter.backends.core import Scales, after_attention, plan_step  # noqa: E402
from prefixkv_vllm.vllm_adapter.kv_spec import PrefixKVAttentionSpec  # noqa: E402
from prefixkv_vllm.vllm_adapter.worker_state import BatchInfo, WorkerState  # noqa: E402

from .settings import policy as build_policy  # noqa: E402

BLOCK, HKV, HQ, DIM = 8, 2, 4, 16
real_compact = ops.compact


def plan_of(spec, policy, batch, qsl, seq_lens, table, seq_lens_cpu=None, state=None):
    """``plan_step`` as a builder calls it, with ``batch`` as the runner's step (a fresh runner state by default)."""
    state = WorkerState() if state is None else state
    state.batch = batch
    return plan_step(spec, policy, state, qsl, seq_lens, table, seq_lens_cpu, decode_window=32)


def spec(ratio, sink=1, recent=1, budget=None, decode="off", interval=16):
    return PrefixKVAttentionSpec(
        block_size=BLOCK, num_kv_heads=HKV, head_size=DIM, dtype=torch.float32, keep_ratio=ratio, sink=sink, recent=recent,
        budget=ratio if budget is None else budget, ratio_curve=(), decode=decode, interval=interval, prefix_caching=False,
    )


def step_inputs(computed, scheduled, max_blocks=12):
    seq_lens = torch.tensor([c + s for c, s in zip(computed, scheduled)], dtype=torch.int32)
    query_start_loc = torch.tensor(np.concatenate([[0], np.cumsum(scheduled)]), dtype=torch.int32)
    table = torch.arange(len(computed) * max_blocks, dtype=torch.int32).view(len(computed), max_blocks)
    return query_start_loc, seq_lens, table


class TestKeptBlocks:
    @pytest.mark.parametrize(
        "prompt_len, ratio, expected",
        [(7, 0.2, 0), (64, 1.0, 8), (64, 0.25, 2), (70, 0.25, 1), (64, 0.01, 1), (300, 0.5, 18)],
    )
    def test_values(self, prompt_len, ratio, expected):
        assert kept_prompt_blocks(prompt_len, ratio, BLOCK, sink=1, recent=1) == expected

    def test_protected_tokens_fit(self):
        for prompt_len in range(1, 200):
            tail = prompt_len % BLOCK
            kept = kept_prompt_blocks(prompt_len, 0.01, BLOCK, sink=4, recent=12)
            body = (prompt_len // BLOCK) * BLOCK
            assert kept * BLOCK >= min(body, 4 + max(0, 12 - tail)) or kept == prompt_len // BLOCK


class TestPlan:
    def test_prefill_then_decode(self):
        policy = build_policy("uniform", 0.25, scorer="mean")
        prompt = 64  # 8 blocks, keeps 2
        batch = BatchInfo(req_ids=["a"], prompt_lens=np.array([prompt]))
        plan = plan_of(spec(0.25), policy, batch, *step_inputs([0], [prompt]))
        assert plan.work.score.rows == [0] and plan.work.compact.rows == [0]
        # The 2 kept blocks' worth of tokens go to blocks 6-7, so the freed blocks are a prefix.
        assert (plan.work.compact.start_after, plan.work.compact.end_after) == ([6], [8])
        assert torch.equal(plan.seq_lens, torch.tensor([prompt], dtype=torch.int32))  # prefill reads everything

        qsl, seq_lens, table = step_inputs([prompt + 3], [1])
        plan = plan_of(spec(0.25), policy, batch, qsl, seq_lens, table)
        assert plan.work is None  # decode: only the metadata changes
        freed = 8 - 2
        assert plan.seq_lens.tolist() == [prompt + 4 - freed * BLOCK]
        assert plan.block_table[0, :4].tolist() == [6, 7, 8, 9]  # the live run: kept blocks, then the tail
        assert plan.max_seq_len == prompt + 4 - freed * BLOCK

    def test_host_lengths_avoid_reading_the_device(self):
        class DeviceOnly(torch.Tensor):
            def cpu(self, *args, **kwargs):
                raise AssertionError("plan_step copied seq_lens from the device")

        policy = build_policy("uniform", 0.25, scorer="mean")
        batch = BatchInfo(req_ids=["a", "b"], prompt_lens=np.array([64, 40]))
        qsl, seq_lens, table = step_inputs([67, 0], [1, 40])
        expected = plan_of(spec(0.25), policy, batch, qsl, seq_lens, table)
        plan = plan_step(spec(0.25), policy, WorkerState(batch=batch), qsl, seq_lens.as_subclass(DeviceOnly), table, seq_lens.clone(), 32)
        assert plan.seq_lens.tolist() == expected.seq_lens.tolist() == [68 - 6 * BLOCK, 40]
        assert plan.seq_lens_cpu.tolist() == expected.seq_lens_cpu.tolist() == plan.seq_lens.tolist()
        assert plan.max_seq_len == expected.max_seq_len == 40
        assert torch.equal(plan.block_table, expected.block_table)
        assert plan.work.compact.rows == expected.work.compact.rows == [1]

    def test_request_budgets_move_the_layer_ratio(self):
        policy = build_policy("uniform", 0.25, scorer="mean")
        prompts = np.array([64, 64, 64, 64])
        budgets = np.array([np.nan, 1.0, 0.125, 0.625])
        batch = BatchInfo(req_ids=["server", "whole", "eighth", "more"], prompt_lens=prompts, request_budgets=budgets)
        plan = plan_of(spec(0.25, budget=0.25), policy, batch, *step_inputs([0] * 4, [64] * 4))
        # 0.25 -> 2 of 8 blocks; 1.0 -> all 8, nothing to compact; 0.125 -> 1; 0.625 -> halfway to 1 -> 5.
        assert plan.work.compact.rows == [0, 2, 3]
        assert plan.work.compact.start_after == [8 - 2, 8 - 1, 8 - 5]
        plan = plan_of(spec(0.25, budget=0.25), policy, batch, *step_inputs([65] * 4, [1] * 4))
        assert plan.seq_lens.tolist() == [66 - 6 * BLOCK, 66, 66 - 7 * BLOCK, 66 - 3 * BLOCK]

    def test_request_budget_compresses_under_a_full_server_budget(self):
        policy = build_policy("uniform", 1.0, scorer="mean")
        batch = BatchInfo(req_ids=["a", "b"], prompt_lens=np.array([64, 64]), request_budgets=np.array([np.nan, 0.25]))
        plan = plan_of(spec(1.0), policy, batch, *step_inputs([0, 0], [64, 64]))
        assert plan.work.compact.rows == [1] and plan.work.compact.start_after == [8 - 2]
        assert plan_of(spec(1.0), policy, BatchInfo(["a"], np.array([64])), *step_inputs([0], [64])) is None

    def test_nothing_to_do_returns_none(self):
        policy = build_policy("uniform", 0.25)
        batch = BatchInfo(req_ids=["short"], prompt_lens=np.array([5]))
        assert plan_of(spec(0.25), policy, batch, *step_inputs([5], [1])) is None
        assert plan_of(spec(1.0), policy, BatchInfo(["a"], np.array([64])), *step_inputs([0], [64])) is None
        assert plan_of(spec(0.25), policy, None, *step_inputs([0], [64])) is None

    def test_chunks_and_window(self):
        policy = build_policy("uniform", 0.25, scorer="window", window=8)
        batch = BatchInfo(req_ids=["a", "b"], prompt_lens=np.array([64, 64]))
        plan = plan_of(spec(0.25), policy, batch, *step_inputs([0, 32], [32, 32]))
        # Row 0's first chunk has no window query (positions < 56); row 1 finishes its prompt.
        assert plan.work.score.rows == [1] and plan.work.compact.rows == [1]
        assert plan.work.score.min_query_pos.tolist() == [56]

    def test_resumed_request_scores_only_prompt_queries(self):
        policy = build_policy("uniform", 0.25, scorer="mean")
        batch = BatchInfo(req_ids=["a"], prompt_lens=np.array([64]))
        plan = plan_of(spec(0.25), policy, batch, *step_inputs([0], [80]))  # recompute of prompt + 16 outputs
        assert plan.work.score.seq_lens.tolist() == [64]
        assert plan.work.score.token_index.numel() == 64
        assert plan.work.compact.rows == [0]


def _run_prompt(chunks, scorer, per_kv_head=False, seed=0):
    """Feed one 61-token prompt through plan_step/after_attention in the given chunks."""
    gen = torch.Generator().manual_seed(seed)
    prompt = sum(chunks)
    policy = build_policy("uniform", 0.3, scorer=scorer, per_kv_head=per_kv_head, sink=2, recent=3)
    cache = torch.randn(2, 10, BLOCK, HKV, DIM, generator=gen)
    keys, values = cache[0], cache[1]
    query_all = torch.randn(prompt, HQ, DIM, generator=gen)
    batch = BatchInfo(req_ids=["r"], prompt_lens=np.array([prompt]))
    state = WorkerState()
    computed = 0
    for chunk in chunks:
        qsl, seq_lens, table = step_inputs([computed], [chunk], max_blocks=10)
        step = plan_of(spec(0.3, sink=2, recent=3), policy, batch, qsl, seq_lens, table, state=state)
        if step is not None and step.work is not None:
            after_attention(step.work, "layer", query_all[computed : computed + chunk], keys, values, Scales(DIM**-0.5))
            state.moves.flush()  # the model runner's end of the forward
        computed += chunk
    assert state.store.take_scores("r", "layer", prompt) is None  # compaction consumed the scores
    return cache


@pytest.mark.parametrize("scorer", ["raw", "mean", "window"])
@pytest.mark.parametrize("per_kv_head", [False, True])
def test_chunked_prefill_compacts_like_one_shot(scorer, per_kv_head):
    one_shot = _run_prompt([61], scorer, per_kv_head)
    chunked = _run_prompt([16, 24, 21], scorer, per_kv_head)
    assert kept_prompt_blocks(61, 0.3, BLOCK, 2, 3) == 2
    torch.testing.assert_close(chunked[:, 5:7], one_shot[:, 5:7])  # the compacted blocks, before the tail block


def test_compaction_keeps_the_top_scored_tokens():
    gen = torch.Generator().manual_seed(3)
    prompt = 61
    cache = torch.randn(2, 10, BLOCK, HKV, DIM, generator=gen)
    original = cache.clone()
    query = torch.randn(prompt, HQ, DIM, generator=gen)
    policy = build_policy("uniform", 0.3, scorer="mean", sink=2, recent=3)
    qsl, seq_lens, table = step_inputs([0], [prompt], max_blocks=10)
    state = WorkerState()
    step = plan_of(spec(0.3, sink=2, recent=3), policy, BatchInfo(["r"], np.array([prompt])), qsl, seq_lens, table, state=state)
    after_attention(step.work, "layer", query, cache[0], cache[1], Scales(DIM**-0.5))
    assert torch.equal(cache, original)  # the move waits for the end of the forward
    state.moves.flush()

    scores = torch.zeros(1, HKV, prompt)
    ref.importance(query, original[0], table, qsl, seq_lens, torch.zeros(1, dtype=torch.int32), DIM**-0.5, scores)
    body = 56  # 7 full blocks; the 5-token tail stays in place and counts as recent
    ranked = policy.scorer.scores(scores[0], prompt)[0, :body].clone()
    ranked[:2] = float("inf")
    expected = ranked.argsort(descending=True, stable=True)[:16].sort().values
    # Written into blocks 5-6 (slots 40-55): tokens already there first, then the moved ones.
    order = torch.cat([expected[expected >= 40], expected[expected < 40]])
    kept = original[0].reshape(-1, HKV, DIM)[order]
    assert torch.equal(cache[0].reshape(-1, HKV, DIM)[40:56], kept)
    assert torch.equal(state.store.positions("r", "layer")[0], order)
    assert torch.equal(cache[0, 7], original[0, 7])  # the tail block is untouched


class TwoRanks:
    """Two tensor-parallel ranks' ``mean_over_ranks``: an all-reduce, as threads meeting at a barrier."""

    def __init__(self) -> None:
        self.barrier, self.rows, self.calls = threading.Barrier(2, timeout=30), [None, None], 0

    def mean_over_ranks(self, rank: int):
        def reduce(scores):
            self.rows[rank] = scores
            self.barrier.wait()
            mean = (self.rows[0] + self.rows[1]) / 2
            self.calls += rank == 0
            self.barrier.wait()
            return mean

        return reduce


@pytest.mark.parametrize("scorer", ["mean", "window"])
@pytest.mark.parametrize("per_kv_head", [False, True])
def test_tensor_parallel_ranks_compact_their_heads_as_one_rank_would(scorer, per_kv_head):
    gen = torch.Generator().manual_seed(5)
    prompt = 61
    cache = torch.randn(2, 10, BLOCK, HKV, DIM, generator=gen)
    query = torch.randn(prompt, HQ, DIM, generator=gen)
    policy = build_policy("uniform", 0.3, scorer=scorer, per_kv_head=per_kv_head, sink=2, recent=3)
    batch = BatchInfo(["r"], np.array([prompt]))

    def compact(cache, query, mean_over_ranks=None):
        state = WorkerState(mean_over_ranks=mean_over_ranks)
        step = plan_of(spec(0.3, sink=2, recent=3), policy, batch, *step_inputs([0], [prompt], max_blocks=10), state=state)
        after_attention(step.work, "layer", query, cache[0], cache[1], Scales(DIM**-0.5))
        state.moves.flush()

    whole = cache.clone()
    compact(whole, query)
    ranks, heads = TwoRanks(), HQ // HKV  # rank r holds KV head r and its query heads
    shards = [cache[:, :, :, r : r + 1].clone() for r in range(2)]
    threads = [
        threading.Thread(target=compact, args=(shards[r], query[:, r * heads : (r + 1) * heads], ranks.mean_over_ranks(r)))
        for r in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert torch.equal(torch.cat(shards, dim=3), whole)
    assert ranks.calls == (0 if per_kv_head else 1)  # one shared selection of the prompt
    assert not torch.equal(whole, cache)


def _prompt_end_of_layers(num_layers, flush_each_layer, monkeypatch):
    """One 61-token prompt step over ``num_layers`` layers (each its own cache and queries); the op calls it made."""
    gen = torch.Generator().manual_seed(11)
    caches = [torch.randn(2, 10, BLOCK, HKV, DIM, generator=gen) for _ in range(num_layers)]
    queries = [torch.randn(61, HQ, DIM, generator=gen) for _ in range(num_layers)]
    policy = build_policy("uniform", 0.3, scorer="mean", per_kv_head=True, sink=2, recent=3)
    state = WorkerState()
    step = plan_of(spec(0.3, sink=2, recent=3), policy, BatchInfo(["r"], np.array([61])), *step_inputs([0], [61], max_blocks=10), state=state)
    calls = []
    monkeypatch.setattr(ops, "compact", lambda *args: (calls.append(len(args[0])), real_compact(*args)))
    for layer, (cache, query) in enumerate(zip(caches, queries)):
        after_attention(step.work, f"layer.{layer}", query, cache[0], cache[1], Scales(DIM**-0.5))
        if flush_each_layer:
            state.moves.flush()
    state.moves.flush()
    return caches, calls


def test_a_step_compacting_several_layers_launches_one_compact(monkeypatch):
    batched, calls = _prompt_end_of_layers(3, flush_each_layer=False, monkeypatch=monkeypatch)
    assert calls == [3]  # one call, all three layers
    one_by_one, calls = _prompt_end_of_layers(3, flush_each_layer=True, monkeypatch=monkeypatch)
    assert calls == [1, 1, 1]
    for mine, expected in zip(batched, one_by_one):
        assert torch.equal(mine, expected)


def test_more_layers_than_one_cuda_call_takes_split_into_calls(monkeypatch):
    monkeypatch.setattr(worker_state, "_MAX_LAYERS_PER_CALL", 2)
    batched, calls = _prompt_end_of_layers(5, flush_each_layer=False, monkeypatch=monkeypatch)
    assert calls == [2, 2, 1]
    one_by_one, _ = _prompt_end_of_layers(5, flush_each_layer=True, monkeypatch=monkeypatch)
    for mine, expected in zip(batched, one_by_one):
        assert torch.equal(mine, expected)
