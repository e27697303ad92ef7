"""A KV-cache spec that carries a layer's keep ratio, and the manager that frees its blocks.

Layers whose specs differ land in different KV-cache groups (vLLM's hybrid
allocator), so each group can free its own share of every request. The manager
runs in the scheduler process and frees the blocks before the layer's live run
(``policy.paged.live_blocks``); it learns nothing from the worker, both sides
derive the same layout from the same lengths.

With prefix caching on, the manager also hashes only a request's write-once
prefix (``policy.paged.shared_prefix_blocks``), and ``shared_prefix_tokens`` caps
its cache hits there (``hooks.scheduler``), so a block is served
from the cache only while its content is what its hash stands for.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheSpec

from ..policy.paged import PagedLayout, last_event, live_blocks, request_keep_ratio, shared_prefix_blocks
from .request_options import SchedulerBudgets

# The fields PrefixKV adds; layers that differ in any of them need their own KV-cache group.
_PREFIXKV_FIELDS = ("keep_ratio", "sink", "recent", "budget", "ratio_curve", "decode", "interval", "prefix_caching")


@dataclass(frozen=True, kw_only=True)
class PrefixKVAttentionSpec(FullAttentionSpec):
    """vLLM's full-attention spec plus the layer's PrefixKV settings (their defaults: ``config.PrefixKVConfig``)."""

    keep_ratio: float
    sink: int
    recent: int
    budget: float  # the server's mean budget over layers, which per-request budgets rescale
    # The layer's ratio at any request budget, as knots (budget, ratio) of the loss
    # allocation (policy.costs.allocation_curves); empty: per-request budgets rescale keep_ratio.
    ratio_curve: tuple[tuple[float, float], ...]
    decode: str  # decode-time eviction mode (policy.paged.DECODE_MODES)
    interval: int  # generated tokens between decode rounds
    prefix_caching: bool  # vLLM's prefix caching is on

    @property
    def prefixkv_settings(self) -> tuple:
        return tuple(getattr(self, name) for name in _PREFIXKV_FIELDS)

    @functools.cached_property  # read for every request, group and step
    def layout(self) -> PagedLayout:
        return PagedLayout(self.block_size, self.sink, self.recent, self.decode, self.interval, self.prefix_caching)

    def request_ratio(self, request_budget: float | None = None) -> float:
        """The layer's keep ratio at the server's budget or at a request's own."""
        if request_budget is None:
            return self.keep_ratio
        return request_keep_ratio(self.keep_ratio, self.budget, request_budget, self.ratio_curve)

    def shared_blocks(self, prompt_len: int, request_budget: float | None = None) -> int | None:
        """The request's write-once prefix in blocks (``policy.paged.shared_prefix_blocks``), at the server's budget or its own."""
        return shared_prefix_blocks(prompt_len, self.budget if request_budget is None else request_budget, self.layout)

    @classmethod
    def merge(cls, specs: list["PrefixKVAttentionSpec"]) -> "PrefixKVAttentionSpec":
        # FullAttentionSpec.merge rebuilds the spec from its own fields only.
        if not all(isinstance(spec, PrefixKVAttentionSpec) for spec in specs):
            # vLLM's grouping also probes merging with other kinds (a hybrid model's sliding-window layers).
            raise AssertionError("a PrefixKV layer cannot share a KV-cache group with another kind of layer")
        settings = {spec.prefixkv_settings for spec in specs}
        if len(settings) != 1:
            # vLLM's grouping probes merge() and reads an AssertionError as "not uniform".
            raise AssertionError("layers with different PrefixKV keep ratios cannot share a KV-cache group")
        return cls.of(FullAttentionSpec.merge(specs), **dict(zip(_PREFIXKV_FIELDS, settings.pop())))

    @classmethod
    def of(cls, spec: FullAttentionSpec, **settings) -> "PrefixKVAttentionSpec":
        """``spec`` (vLLM's) with the PrefixKV ``settings``."""
        fields = {f.name: getattr(spec, f.name) for f in dataclasses.fields(FullAttentionSpec) if f.init}
        return cls(**fields, **settings)

    def is_uniform_with_collection(self, kv_cache_specs: dict[str, KVCacheSpec]) -> bool:
        # The default isinstance check would fold every tier back into one group.
        return all(
            isinstance(spec, PrefixKVAttentionSpec) and spec.prefixkv_settings == self.prefixkv_settings
            for spec in kv_cache_specs.values()
        )


class PrefixKVAttentionManager(FullAttentionManager):
    """Frees each request's blocks before its live run, and hashes only its write-once prefix.

    The scheduler asks every group's manager about every running request at every
    step, while a request's run moves only at its layout events (``policy.paged``,
    invariant 5) and its write-once prefix never changes. So both are kept per request
    until its blocks are freed (it finished or was preempted: a resumed one starts over).

    ``request_budgets`` are the requests' own budgets, which the scheduler hook owns and
    hands over when it binds the scheduler (``hooks.scheduler``); until then every
    request is at the server's budget.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.request_budgets = SchedulerBudgets()
        self._freed_at: dict[str, int] = {}  # request -> the layout event its blocks were last freed for
        self._hash_cap: dict[str, int | None] = {}  # request -> shared_prefix_tokens

    def remove_skipped_blocks(
        self, request_id: str, processed_computed_tokens: int, num_prompt_tokens: int | None = None
    ) -> None:
        if num_prompt_tokens is None or processed_computed_tokens < num_prompt_tokens:
            return  # the worker compacts in the step that finishes the prompt
        spec: PrefixKVAttentionSpec = self.kv_cache_spec
        event = last_event(num_prompt_tokens, processed_computed_tokens, spec.layout)
        if self._freed_at.get(request_id) == event:
            return
        ratio = spec.request_ratio(self.request_budgets.get(request_id))
        start, _ = live_blocks(num_prompt_tokens, event, ratio, spec.layout)
        # Walks backwards and stops at the first freed block.
        self._remove_blocks_in_range(request_id, 0, start)
        self._freed_at[request_id] = event

    def cache_blocks(self, request, num_tokens: int, *args, **kwargs) -> None:
        if request.request_id not in self._hash_cap:
            budget = self.request_budgets.get(request.request_id)
            self._hash_cap[request.request_id] = shared_prefix_tokens(self.kv_cache_spec, request.num_prompt_tokens, budget)
        cap = self._hash_cap[request.request_id]
        super().cache_blocks(request, num_tokens if cap is None else min(num_tokens, cap), *args, **kwargs)

    def pop_blocks_for_free(self, request_id: str):
        # Every way vLLM frees a request (free, and the coordinator's batched free) comes here.
        self._freed_at.pop(request_id, None)
        self._hash_cap.pop(request_id, None)
        return super().pop_blocks_for_free(request_id)


def shared_prefix_tokens(spec: PrefixKVAttentionSpec, num_prompt_tokens: int, budget: float | None) -> int | None:
    """Tokens of a request that may be hashed or reused from the prefix cache; ``None``: all.

    ``budget``: the request's own (``None``: the server's)."""
    blocks = spec.shared_blocks(num_prompt_tokens, budget)
    return None if blocks is None else blocks * spec.block_size
