"""Compression-aware admission (scheduler process).

Stock vLLM admits a request when its prompt fits in the free blocks, and preempts
running requests later if their outputs outgrow the pool. With decode-time
eviction each request's footprint is bounded and known in advance
(``policy.paged.peak_live_blocks``: every layer's ratio of the tokens seen, plus
the recent window), so the scheduler can admit only what will fit: a waiting
request is admitted when the free blocks cover its own peak *and* what every
running request may still grow to. vLLM's sliding-window admission cap
(``max_admission_blocks_per_request``) is the precedent; here the reservation
goes through ``allocate_slots``'s ``reserved_blocks``.

A request's horizon is its ``max_tokens`` (the OpenAI server sets it to the rest
of the context when a client gives none), so requests that stop early leave
blocks unused until they finish; ``--kv-admission stock`` keeps vLLM's optimistic
rule instead.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ..policy.paged import live_blocks, peak_live_blocks
from .kv_spec import PrefixKVAttentionSpec
from .request_options import SchedulerBudgets


class Admission:
    """Peaks and holdings of every KV-cache group, per request.

    PrefixKV groups follow ``policy.paged``. The other groups of a hybrid model
    (sliding-window, chunked-local: vLLM's own managers) follow vLLM's rules: a
    group holds the blocks its manager has not skipped (``get_num_skipped_tokens``),
    and its peak is capped by the spec's ``max_admission_blocks_per_request``, the
    bound vLLM sizes its pool and admits by: the tokens in flight on top of the
    window (a prefill chunk per concurrent batch while prefilling, one token per
    concurrent batch while decoding). A group without such a bound (e.g. Mamba)
    counts as holding every token, which over-reserves and never under-reserves.
    """

    def __init__(self, vllm_config, kv_cache_config, managers, running: Callable[[], list], budgets: SchedulerBudgets) -> None:
        groups = list(zip((group.kv_cache_spec for group in kv_cache_config.kv_cache_groups), managers))
        self.specs = [spec for spec, _ in groups if isinstance(spec, PrefixKVAttentionSpec)]
        self.others = [(spec, manager) for spec, manager in groups if not isinstance(spec, PrefixKVAttentionSpec)]
        if not self.specs:
            raise TypeError("compression-aware admission needs a PrefixKV KV-cache group")
        self.layout = self.specs[0].layout
        # Read at every admission: vLLM replaces the scheduler's list (``remove_all``) when
        # several requests finish in one step, so a list kept from start-up goes stale.
        self.running = running
        self.budgets = budgets  # the requests' own, the scheduler hook's
        self.max_model_len = vllm_config.model_config.max_model_len
        self.in_flight = {True: vllm_config.max_in_flight_tokens, False: vllm_config.max_concurrent_batches}
        self._peaks: dict[tuple[str, bool], int] = {}

    def _ratios(self, request_id: str) -> np.ndarray:
        budget = self.budgets.get(request_id)
        ratios = [spec.request_ratio(budget) for spec in self.specs]
        return np.minimum(np.array(ratios), 1.0)

    def peak(self, request) -> int:
        """The most blocks ``request`` will hold from now on: its prompt's peak only while that is ahead."""
        prefill = request.num_computed_tokens < request.num_prompt_tokens
        key = (request.request_id, prefill)
        peak = self._peaks.get(key)
        if peak is None:
            final_len = min(request.num_prompt_tokens + request.max_tokens, self.max_model_len)
            ratios = self._ratios(request.request_id)
            peak = peak_live_blocks(request.num_prompt_tokens, final_len, ratios, self.layout, prefill=prefill)
            peak += sum(self._other_peak(spec, final_len, prefill) for spec, _ in self.others)
            self._peaks[key] = peak
        return peak

    def _other_peak(self, spec, final_len: int, prefill: bool) -> int:
        blocks = -(-final_len // spec.block_size)
        bound = getattr(spec, "max_admission_blocks_per_request", None)
        if bound is None:
            return blocks
        cap = bound(self.in_flight[False], self.max_model_len)
        if prefill:
            cap = max(cap, bound(self.in_flight[True], self.max_model_len))
        return min(blocks, cap)

    def _other_blocks(self, tokens: int, computed: int) -> int:
        """Blocks vLLM's own groups hold with ``tokens`` slots once ``computed`` tokens are processed."""
        return sum(
            -(-tokens // spec.block_size) - manager.get_num_skipped_tokens(computed) // spec.block_size
            for spec, manager in self.others
        )

    def held(self, request) -> int:
        computed = request.num_computed_tokens
        start, _ = live_blocks(request.num_prompt_tokens, computed, self._ratios(request.request_id), self.layout)
        compressed = int((-(-computed // self.layout.block_size) - np.asarray(start)).sum())
        return compressed + self._other_blocks(computed, computed)

    def reserved_for(self, request, num_new_tokens: int) -> int:
        """Blocks to keep free when admitting ``request``: the running requests' growth and its own beyond this step."""
        growth = sum(max(0, self.peak(r) - self.held(r)) for r in self.running() if r is not request)
        tokens = request.num_computed_tokens + num_new_tokens
        now = len(self.specs) * -(-tokens // self.layout.block_size) + self._other_blocks(tokens, request.num_computed_tokens)
        return growth + max(0, self.peak(request) - now)

    def release(self, request_id: str) -> None:
        self._peaks.pop((request_id, True), None)
        self._peaks.pop((request_id, False), None)
