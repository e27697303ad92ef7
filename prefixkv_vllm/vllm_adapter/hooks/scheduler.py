"""The scheduler: per-request budgets for the KV-cache managers, admission, and prefix-cache hits.

The scheduler hook owns the requests' own budgets (``SchedulerBudgets``) and hands them to
every PrefixKV KV-cache manager and to admission.
"""

from __future__ import annotations

from ...config import PrefixKVConfig


def install() -> None:
    from vllm.v1.core.sched.scheduler import Scheduler

    from . import bind_when_active

    bind_when_active(Scheduler, bind_scheduler)


def bind_scheduler(scheduler, config: PrefixKVConfig) -> None:
    from ..kv_spec import PrefixKVAttentionManager
    from ..request_options import SchedulerBudgets, budget_of

    budgets = SchedulerBudgets()
    manager = scheduler.kv_cache_manager
    for group_manager in manager.coordinator.single_type_managers:
        if isinstance(group_manager, PrefixKVAttentionManager):
            group_manager.request_budgets = budgets
    admission = _reserve_at_admission(scheduler, budgets) if config.admission == "reserve" else None
    if scheduler.cache_config.enable_prefix_caching:
        _cap_cache_hits(manager, budgets)
    original_add = scheduler.add_request
    original_free = scheduler._free_request

    def add_request(request):
        if request.sampling_params is not None:
            budgets.admit(request.request_id, budget_of(request.sampling_params))
        return original_add(request)

    def _free_request(request, *args, **kwargs):
        budgets.release(request.request_id)
        if admission is not None:
            admission.release(request.request_id)
        return original_free(request, *args, **kwargs)

    scheduler.add_request = add_request
    scheduler._free_request = _free_request


def _reserve_at_admission(scheduler, budgets):
    """Waiting and preempted requests are admitted with ``reserved_blocks`` (``admission``)."""
    from vllm.v1.request import RequestStatus

    from ..admission import Admission

    manager = scheduler.kv_cache_manager
    admission = Admission(
        scheduler.vllm_config,
        scheduler.kv_cache_config,
        manager.coordinator.single_type_managers,
        lambda: scheduler.running,
        budgets,
    )
    original_allocate = manager.allocate_slots

    def allocate_slots(request, num_new_tokens, num_new_computed_tokens=0, *args, **kwargs):
        if request.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED):
            reserve = admission.reserved_for(request, num_new_computed_tokens + num_new_tokens)
            kwargs["reserved_blocks"] = kwargs.get("reserved_blocks", 0) + reserve
        return original_allocate(request, num_new_tokens, num_new_computed_tokens, *args, **kwargs)

    manager.allocate_slots = allocate_slots
    return admission


def _cap_cache_hits(manager, budgets) -> None:
    """A request reuses cached blocks only within its write-once prefix (``kv_spec.shared_prefix_tokens``).

    ``get_computed_blocks`` asks the coordinator for the longest hit up to a length
    it derives from the request alone; the cap depends on the request's prompt and
    budget too, so it is handed to the coordinator for the duration of the call.
    """
    from ..kv_spec import PrefixKVAttentionSpec, shared_prefix_tokens

    specs = [g.kv_cache_spec for g in manager.kv_cache_config.kv_cache_groups]
    spec = next(s for s in specs if isinstance(s, PrefixKVAttentionSpec))
    coordinator = manager.coordinator
    original_get = manager.get_computed_blocks
    original_find = coordinator.find_longest_cache_hit
    cap: list[int | None] = [None]

    def find_longest_cache_hit(block_hashes, max_cache_hit_length, *args, **kwargs):
        if cap[0] is not None:
            max_cache_hit_length = min(max_cache_hit_length, cap[0])
        return original_find(block_hashes, max_cache_hit_length, *args, **kwargs)

    def get_computed_blocks(request, *args, **kwargs):
        cap[0] = shared_prefix_tokens(spec, request.num_prompt_tokens, budgets.get(request.request_id))
        try:
            return original_get(request, *args, **kwargs)
        finally:
            cap[0] = None

    coordinator.find_longest_cache_hit = find_longest_cache_hit
    manager.get_computed_blocks = get_computed_blocks
