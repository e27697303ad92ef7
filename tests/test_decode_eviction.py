"""Decode-time eviction without an engine: the layout contract, and a token-by-token simulation of one request.

The simulation plays vLLM's part: it writes each new token's K/V to logical block
``pos // block_size`` (as the slot mapping does), lets the scheduler free the
blocks before ``live_blocks(...)[0]`` (as the KV manager does), and checks what
the attention kernel would read through the effective table at every step.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pytest.importorskip("vllm")

from prefixkv_vllm.policy.paged import (  # noqa: E402
    kept_prompt_blocks,
    last_event,
    live_blocks,
    peak_live_blocks,
    shared_prefix_blocks,
)
from prefixkv_vllm.vllm_adapter.backends.core import Scales, after_attention, plan_step, publish_device_starts  # noqa: E402
from prefixkv_vllm.vllm_adapter.kv_spec import PrefixKVAttentionSpec  # noqa: E402
from prefixkv_vllm.vllm_adapter.request_options import SchedulerBudgets  # noqa: E402
from prefixkv_vllm.vllm_adapter.worker_state import BatchInfo, WorkerState  # noqa: E402

from .settings import layout as paged_layout  # noqa: E402
from .settings import policy as build_policy  # noqa: E402

BLOCK, HKV, HQ, DIM = 8, 2, 4, 8
INTERVAL, RECENT = 16, 4
# Round intervals the layout tests run at: two blocks, and one (the server's default of 32 tokens at block size 32).
INTERVALS = (INTERVAL, BLOCK)


def layer_spec(ratio, decode, budget=None, prefix_caching=False, interval=INTERVAL):
    return PrefixKVAttentionSpec(
        block_size=BLOCK, num_kv_heads=HKV, head_size=DIM, dtype=torch.float32, keep_ratio=ratio, sink=1,
        recent=RECENT, budget=ratio if budget is None else budget, ratio_curve=(), decode=decode, interval=interval,
        prefix_caching=prefix_caching,
    )


@pytest.mark.parametrize("interval", INTERVALS)
class TestLayout:
    @pytest.mark.parametrize("decode", ["off", "fifo", "scored"])
    @pytest.mark.parametrize("ratio", [0.1, 0.2, 0.5, 0.9, 1.0])
    def test_start_never_goes_back_and_stays_behind_the_recent_tokens(self, decode, ratio, interval):
        layout = paged_layout(BLOCK, recent=RECENT, decode=decode, interval=interval)
        for prompt in (1, 7, 8, 37, 64, 100):
            computed = np.arange(0, prompt + 400)
            start, end = live_blocks(prompt, computed, ratio, layout)
            assert (np.diff(start) >= 0).all()
            assert (start <= end).all()
            # Never frees a block holding one of the last `recent` tokens, nor the prompt's tail block.
            assert (start * BLOCK <= np.maximum(computed - RECENT, 0)).all()
            assert (start <= np.where(computed >= prompt, prompt // BLOCK, 0)).all() or decode != "off"

    @pytest.mark.parametrize("ratio", [0.1, 0.2, 0.5])
    def test_decode_rounds_hold_the_ratio_of_all_tokens_seen(self, ratio, interval):
        layout = paged_layout(BLOCK, recent=RECENT, decode="fifo", interval=interval)
        prompt = 200
        for computed in range(prompt + interval, prompt + 2000, 7):
            start, _ = live_blocks(prompt, computed, ratio, layout)
            held = math.ceil(computed / BLOCK) * BLOCK - start * BLOCK
            # ratio x tokens seen, plus the stated overhead: recent window, partial blocks, one interval.
            assert held <= ratio * computed + RECENT + interval + 3 * BLOCK
            assert held >= ratio * computed - BLOCK
        off = paged_layout(BLOCK, recent=RECENT, decode="off")
        start, _ = live_blocks(prompt, prompt + 2000, ratio, off)
        assert start == prompt // BLOCK - kept_prompt_blocks(prompt, ratio, BLOCK, 1, RECENT)  # off: only the prompt

    @pytest.mark.parametrize("decode", ["off", "fifo"])
    def test_layout_stands_between_events(self, decode, interval):
        # Invariant 5, which the scheduler's managers rely on to free once per event:
        # the layout after c tokens is the layout at last_event(c).
        rng = np.random.default_rng(0)
        layout = paged_layout(BLOCK, recent=RECENT, decode=decode, interval=interval)
        prompts = rng.integers(0, 300, 400)
        computed = prompts + rng.integers(-50, 500, 400).clip(-prompts)
        ratios = rng.choice([0.05, 0.1, 0.2, 0.37, 0.5, 0.9, 1.0], 400)
        starts, ends = live_blocks(prompts, computed, ratios, layout)
        for i in range(400):
            event = last_event(int(prompts[i]), int(computed[i]), layout)
            assert event <= computed[i]
            assert live_blocks(int(prompts[i]), event, float(ratios[i]), layout) == (starts[i], ends[i])

    def test_full_ratio_never_frees(self, interval):
        layout = paged_layout(BLOCK, recent=RECENT, decode="fifo", interval=interval)
        start, _ = live_blocks(300, np.arange(0, 3000), 1.0, layout)
        assert not start.any()

    def test_peak_bounds_every_state(self, interval):
        layout = paged_layout(BLOCK, recent=RECENT, decode="fifo", interval=interval)
        ratios = np.array([0.1, 0.3, 0.6])
        prompt, final = 150, 600
        peak = peak_live_blocks(prompt, final, ratios, layout)
        for computed in range(prompt, final):
            start, _ = live_blocks(prompt, computed, ratios, layout)
            assert (math.ceil((computed + 1) / BLOCK) - start).sum() <= peak
        assert peak < len(ratios) * math.ceil(final / BLOCK)  # eviction lowers the peak


def test_the_interval_must_be_whole_blocks_only_when_rounds_run():
    paged_layout(64, decode="off", interval=32)  # no decode rounds: the interval is unused
    with pytest.raises(ValueError, match="multiple of the block size 64"):
        paged_layout(64, decode="fifo", interval=32)


def simulate(
    prompt_len, new_tokens, decode, ratio=0.25, chunk=None, per_kv_head=False, request_budget=None, seed=0,
    budget=None, prefix_caching=False, hit=0, interval=INTERVAL,
):
    """Runs one request through prefill (in chunks) and decoding; returns the tags of the live tokens per step.

    With ``prefix_caching``, the first ``hit`` tokens come from the prefix cache (written before
    the request starts), and no step may change a block of the request's write-once prefix.
    """
    gen = torch.Generator().manual_seed(seed)
    total = prompt_len + new_tokens
    max_blocks = math.ceil(total / BLOCK) + 1
    keys = torch.randn(max_blocks, BLOCK, HKV, DIM, generator=gen)
    values = torch.full((max_blocks, BLOCK, HKV, DIM), -1.0)  # -1: never written
    queries = torch.randn(total, HQ, DIM, generator=gen)
    table = torch.arange(max_blocks, dtype=torch.int32)[None, :]
    spec = layer_spec(ratio, decode, budget, prefix_caching, interval)
    policy = build_policy("uniform", ratio, scorer="window", window=4, per_kv_head=per_kv_head, sink=1, recent=RECENT)
    budgets = np.array([np.nan if request_budget is None else request_budget])
    state = WorkerState(batch=BatchInfo(req_ids=["r"], prompt_lens=np.array([prompt_len]), request_budgets=budgets))
    layer_ratio = spec.request_ratio(request_budget)
    shared = shared_prefix_blocks(prompt_len, spec.budget if request_budget is None else request_budget, spec.layout)
    shared = max_blocks if shared is None else shared
    assert hit % BLOCK == 0 and hit <= shared * BLOCK
    values[: hit // BLOCK] = torch.arange(hit).float().view(-1, BLOCK, 1, 1).expand(-1, -1, HKV, DIM)
    computed, history = hit, []
    while computed < total:
        step = min(chunk or prompt_len, prompt_len - computed) if computed < prompt_len else 1
        positions = torch.arange(computed, computed + step)
        values[positions // BLOCK, positions % BLOCK] = positions.float()[:, None, None]  # the slot mapping
        seq_lens = torch.tensor([computed + step], dtype=torch.int32)
        qsl = torch.tensor([0, step], dtype=torch.int32)
        plan = plan_step(spec, policy, state, qsl, seq_lens, table, None, decode_window=4)
        effective_table, effective_len = (table, computed + step) if plan is None else (plan.block_table, int(plan.seq_lens[0]))
        # What attention reads: every live slot holds a distinct real token, the recent ones included.
        slots = torch.arange(effective_len)
        read = values[effective_table[0, slots // BLOCK].long(), slots % BLOCK]  # [n, Hkv, D]
        tags = read[:, :, 0]
        assert (tags >= 0).all(), f"step at {computed}: read a slot never written"
        assert (tags <= computed + step - 1).all()
        for head in range(HKV):
            assert tags[:, head].unique().numel() == effective_len, f"step at {computed}: a token read twice"
        recent = torch.arange(max(0, computed + step - RECENT), computed + step).float()
        assert torch.isin(recent, tags[:, 0]).all()
        # The scheduler frees the blocks before the live run of the state this step read.
        start, _ = live_blocks(prompt_len, computed, layer_ratio, spec.layout)
        assert (effective_table[0, : math.ceil(effective_len / BLOCK)] >= start).all()
        if plan is not None and plan.work is not None:
            before = values.clone()
            after_attention(plan.work, "layer", queries[computed : computed + step], keys, values, Scales(DIM**-0.5))
            state.moves.flush()  # the model runner's end of the forward
            if prefix_caching:
                assert torch.equal(values[:shared], before[:shared]), f"step at {computed}: rewrote a shared block"
        computed += step
        # Freed blocks go to other requests: poison them.
        values[: live_blocks(prompt_len, computed, layer_ratio, spec.layout)[0]] = -1.0
        history.append(tags)
    return history


@pytest.mark.parametrize("decode", ["off", "fifo", "scored"])
@pytest.mark.parametrize("per_kv_head", [False, True])
@pytest.mark.parametrize("prompt_len, chunk", [(61, None), (61, 20), (96, 32), (5, None)])
def test_every_step_reads_only_live_tokens(decode, per_kv_head, prompt_len, chunk):
    history = simulate(prompt_len, 150, decode, chunk=chunk, per_kv_head=per_kv_head)
    final = history[-1]
    if decode != "off" and prompt_len > 16:
        # Held about ratio x tokens seen plus the recent window and one interval, not the whole output.
        assert final.shape[0] <= 0.25 * (prompt_len + 150) + RECENT + INTERVAL + 3 * BLOCK


@pytest.mark.parametrize("decode", ["fifo", "scored"])
@pytest.mark.parametrize("prompt_len, chunk", [(61, 20), (96, None)])
def test_a_round_every_block_reads_only_live_tokens(decode, prompt_len, chunk):
    # A round every block: the server's default interval at block size 32.
    history = simulate(prompt_len, 150, decode, chunk=chunk, interval=BLOCK)
    assert history[-1].shape[0] <= 0.25 * (prompt_len + 150) + RECENT + BLOCK + 3 * BLOCK


def test_fifo_keeps_the_compressed_prompt_and_the_newest_tokens():
    prompt_len = 96
    history = simulate(prompt_len, 200, "fifo")
    first_decode = history[1][:, 0]
    compressed_prompt = set(first_decode[first_decode < prompt_len].tolist())
    final = history[-1][:, 0]
    assert compressed_prompt <= set(final.tolist())  # the prompt's selection stays for good
    generated = final[final >= prompt_len].sort().values
    total = prompt_len + 200
    assert torch.equal(generated, torch.arange(total - generated.numel(), total).float())  # the newest, no holes


def test_scored_can_evict_prompt_tokens_for_output_tokens():
    prompt_len = 96
    history = simulate(prompt_len, 200, "scored", seed=1)
    first_decode = set(history[1][:, 0].tolist())
    final = set(history[-1][:, 0].tolist())
    assert {t for t in first_decode if t < prompt_len} - final  # some prompt tokens were re-selected away
    assert 0.0 in final  # the sink stays


def test_request_budget_one_keeps_everything_while_decoding():
    history = simulate(61, 100, "fifo", request_budget=1.0)
    assert all(tags.shape[0] == 61 + i for i, tags in enumerate(history[1:], start=1))


class TestPrefixCaching:
    """A write-once prefix: what vLLM may hash and serve from its cache is never rewritten."""

    @pytest.mark.parametrize("decode", ["off", "fifo", "scored"])
    @pytest.mark.parametrize("ratio", [0.1, 0.25, 0.6, 0.9])
    @pytest.mark.parametrize("prompt_len, chunk, hit", [(96, None, 0), (96, 24, 0), (96, None, 40), (61, 20, 16), (5, None, 0)])
    def test_no_step_rewrites_the_shared_prefix(self, decode, ratio, prompt_len, chunk, hit):
        hit = min(hit, shared_prefix_blocks(prompt_len, 0.25, paged_layout(BLOCK, recent=RECENT)) * BLOCK)
        history = simulate(prompt_len, 150, decode, ratio=ratio, chunk=chunk, budget=0.25, prefix_caching=True, hit=hit)
        if decode != "off" and prompt_len > 16:
            assert history[-1].shape[0] <= ratio * (prompt_len + 150) + RECENT + INTERVAL + 3 * BLOCK

    @pytest.mark.parametrize("decode", ["off", "fifo", "scored"])
    def test_a_layer_at_or_below_the_budget_compacts_as_without_caching(self, decode):
        for ratio in (0.1, 0.25):
            plain = simulate(96, 80, decode, ratio=ratio, budget=0.25)
            cached = simulate(96, 80, decode, ratio=ratio, budget=0.25, prefix_caching=True)
            assert all(torch.equal(a, b) for a, b in zip(plain, cached))

    def test_a_layer_above_the_budget_keeps_the_shared_blocks_of_its_run_whole(self):
        prompt_len, ratio = 96, 0.6
        shared = shared_prefix_blocks(prompt_len, 0.25, paged_layout(BLOCK, recent=RECENT))
        start = prompt_len // BLOCK - kept_prompt_blocks(prompt_len, ratio, BLOCK, 1, RECENT)
        assert start < shared
        first_decode = simulate(prompt_len, 1, "off", ratio=ratio, budget=0.25, prefix_caching=True)[1][:, 0]
        whole = torch.arange(start * BLOCK, shared * BLOCK).float()
        assert torch.equal(first_decode[: whole.numel()], whole)  # in place, in order
        plain = simulate(prompt_len, 1, "off", ratio=ratio, budget=0.25)[1][:, 0]
        assert first_decode.numel() == plain.numel()  # the same number of tokens kept

    def test_the_scheduler_caches_and_reuses_only_the_write_once_prefix(self):

        from prefixkv_vllm.vllm_adapter.kv_spec import shared_prefix_tokens

        spec = layer_spec(0.6, "fifo", budget=0.25, prefix_caching=True)
        shares = {name: shared_prefix_tokens(spec, 1000, budget) for name, budget in (("server", None), ("tight", 0.05), ("whole", 1.0))}
        assert shares["server"] == shared_prefix_blocks(1000, 0.25, spec.layout) * BLOCK
        assert 0.7 * 1000 < shares["server"] < shares["tight"] < 1000  # about (1 - budget) of the prompt
        assert shares["whole"] is None

    def test_budget_one_shares_everything(self):
        assert shared_prefix_blocks(1000, 1.0, paged_layout(BLOCK, recent=RECENT)) is None
        history = simulate(61, 40, "fifo", request_budget=1.0, budget=0.25, prefix_caching=True, hit=48)
        assert all(tags.shape[0] == 61 + i for i, tags in enumerate(history[1:], start=1))


def test_device_starts_match_the_host_path():
    spec = layer_spec(0.25, "fifo")
    batch = BatchInfo(req_ids=["a", "b"], prompt_lens=np.array([64, 64]))
    computed = np.array([64 + 40, 10])
    qsl = torch.tensor([0, 1, 2], dtype=torch.int32)
    seq_lens = torch.tensor(computed + 1, dtype=torch.int32)
    table = torch.arange(2 * 30, dtype=torch.int32).view(2, 30)
    policy = build_policy("uniform", 0.25)
    host = plan_step(spec, policy, WorkerState(batch=batch), qsl, seq_lens, table, None, decode_window=4)
    published = publish_device_starts(batch, [spec], computed, "cpu")
    device = plan_step(spec, policy, WorkerState(batch=published), qsl, seq_lens, table, None, decode_window=4)
    assert torch.equal(host.block_table, device.block_table) and torch.equal(host.seq_lens, device.seq_lens)
    assert published.device_starts[spec.prefixkv_settings][0].tolist() == [live_blocks(64, 104, 0.25, spec.layout)[0], 0] == [8, 0]
    assert host.seq_lens[0] < 105 and host.seq_lens[1] == 11


class TestAdmission:
    def admission(self, ratios, running):
        from types import SimpleNamespace

        from prefixkv_vllm.vllm_adapter.admission import Admission

        groups = [SimpleNamespace(kv_cache_spec=layer_spec(r, "fifo", budget=float(np.mean(ratios)))) for r in ratios]
        vllm_config = SimpleNamespace(model_config=SimpleNamespace(max_model_len=4096), max_in_flight_tokens=2048, max_concurrent_batches=1)
        return Admission(vllm_config, SimpleNamespace(kv_cache_groups=groups), [None] * len(groups), lambda: running, SchedulerBudgets())

    @staticmethod
    def request(name, prompt, max_tokens, computed=0):
        from types import SimpleNamespace

        return SimpleNamespace(request_id=name, num_prompt_tokens=prompt, max_tokens=max_tokens, num_computed_tokens=computed)

    def test_reserves_the_running_requests_growth_and_the_newcomers_peak(self):
        running = [self.request("a", 200, 400, computed=210)]
        admission = self.admission([0.1, 0.3], running)
        layout = admission.layout
        newcomer = self.request("b", 100, 50)
        a_peak = peak_live_blocks(200, 600, np.array([0.1, 0.3]), layout, prefill=False)  # its prompt is behind it
        a_held = sum(math.ceil(210 / BLOCK) - live_blocks(200, 210, r, layout)[0] for r in (0.1, 0.3))
        b_peak = peak_live_blocks(100, 150, np.array([0.1, 0.3]), layout)
        assert admission.reserved_for(newcomer, 100) == (a_peak - a_held) + max(0, b_peak - 2 * math.ceil(100 / BLOCK))
        running[0].num_computed_tokens = 590  # further along: less left to grow
        assert admission.reserved_for(newcomer, 100) < (a_peak - a_held) + max(0, b_peak - 2 * math.ceil(100 / BLOCK))

    def test_a_running_request_reserves_no_prompt_it_has_already_compacted(self):
        running = self.request("a", 1024, 512, computed=1030)
        admission = self.admission([0.2, 0.2], [running])
        decode_peak = peak_live_blocks(1024, 1536, np.array([0.2, 0.2]), admission.layout, prefill=False)
        assert decode_peak < 2 * 1024 // BLOCK  # below the prompt's own peak
        held = sum(math.ceil(1030 / BLOCK) - live_blocks(1024, 1030, 0.2, admission.layout)[0] for _ in range(2))
        newcomer = peak_live_blocks(8, 9, np.array([0.2, 0.2]), admission.layout) - 2 * math.ceil(8 / BLOCK)
        assert admission.reserved_for(self.request("b", 8, 1), 8) == decode_peak - held + newcomer

    def test_the_scheduler_hook_reads_the_list_vllm_replaces(self):
        # vLLM's scheduler replaces its running list (remove_all) when several requests
        # finish in one step. Admission once kept the list it was built with, and then
        # admitted a whole second wave as if nothing ran (256+2048 at budget 0.5: 11
        # admitted where 5 fit, 6 preemptions).
        from types import SimpleNamespace

        from vllm.v1.core.sched.utils import remove_all
        from vllm.v1.request import RequestStatus

        from prefixkv_vllm.config import PrefixKVConfig
        from prefixkv_vllm.vllm_adapter.hooks.scheduler import bind_scheduler

        class Request(SimpleNamespace):
            __hash__ = object.__hash__  # vLLM's requests are hashable, remove_all takes a set

        specs = [layer_spec(0.2, "fifo", budget=0.2)] * 2
        reserved = []
        manager = SimpleNamespace(
            coordinator=SimpleNamespace(single_type_managers=[None, None]),
            allocate_slots=lambda request, new, computed=0, **kwargs: reserved.append(kwargs["reserved_blocks"]),
        )
        finished = [Request(request_id=n, num_prompt_tokens=200, max_tokens=400, num_computed_tokens=600) for n in "ab"]
        scheduler = SimpleNamespace(
            vllm_config=SimpleNamespace(model_config=SimpleNamespace(max_model_len=4096), max_in_flight_tokens=2048, max_concurrent_batches=1),
            kv_cache_config=SimpleNamespace(kv_cache_groups=[SimpleNamespace(kv_cache_spec=s) for s in specs]),
            kv_cache_manager=manager, cache_config=SimpleNamespace(enable_prefix_caching=False),
            running=list(finished), add_request=None, _free_request=None,
        )  # fmt: skip
        bind_scheduler(scheduler, PrefixKVConfig(policy="uniform", budget=0.2, admission="reserve"))
        scheduler.running = remove_all(scheduler.running, set(finished))  # both finish in one step: a new list
        for name in "cd":  # two admissions in one step: the second reserves for the first
            request = Request(request_id=name, num_prompt_tokens=200, max_tokens=400, num_computed_tokens=0, status=RequestStatus.WAITING)
            manager.allocate_slots(request, 200)
            scheduler.running.append(request)  # as vLLM's schedule() does once allocation succeeds
        peak = peak_live_blocks(200, 600, np.array([0.2, 0.2]), specs[0].layout)
        own = peak - 2 * math.ceil(200 / BLOCK)
        assert reserved == [own, peak + own]

    def test_compression_lowers_the_reservation(self):
        compressed = self.admission([0.2, 0.2], [self.request("a", 1024, 512)])
        whole = self.admission([1.0, 1.0], [self.request("a", 1024, 512)])
        newcomer = self.request("b", 1024, 512)
        assert compressed.reserved_for(newcomer, 1024) < 0.5 * whole.reserved_for(newcomer, 1024)


@pytest.mark.parametrize("decode", ["off", "fifo"])
@pytest.mark.parametrize("interval", INTERVALS)
def test_scheduler_manager_frees_what_the_layout_says_at_every_step(decode, interval):
    # The manager memoises each request's last freed event; the blocks it holds must
    # still be exactly the live run at every step, and a preempted request (all its
    # blocks freed, then recomputed from scratch) must be freed again as it resumes.
    from vllm.v1.core.block_pool import BlockPool

    from prefixkv_vllm.vllm_adapter.kv_spec import PrefixKVAttentionManager

    spec = layer_spec(0.25, decode, interval=interval)
    pool = BlockPool(num_gpu_blocks=400, enable_caching=False, hash_block_size=BLOCK)
    manager = PrefixKVAttentionManager(spec, block_pool=pool, enable_caching=False, kv_cache_group_id=0, scheduler_block_size=BLOCK)
    prompt = 61

    def run(until):
        for processed in range(0, until):
            manager.remove_skipped_blocks("r", processed, prompt)
            manager.allocate_new_blocks("r", processed + 1, processed + 1)
            start, _ = live_blocks(prompt, processed, 0.25, spec.layout)
            held = [b for b in manager.req_to_blocks["r"] if not b.is_null]
            assert len(held) == math.ceil((processed + 1) / BLOCK) - start, processed

    run(prompt + 3)
    manager.free("r")  # preempted in the same layout event the resumed request reaches first
    assert pool.get_num_free_blocks() == 400 - 1  # the pool's null block
    run(prompt + 5 * interval + 3)
