"""Per-request settings: ``{"vllm_xargs": {"kv_budget": 0.5}}`` in an OpenAI request, or
``SamplingParams(extra_args={"kv_budget": 0.5})`` offline.

A request's ``kv_budget`` moves the mean of its per-layer keep ratios from the
server's ``--kv-budget`` to its own (``policy.paged.request_keep_ratio``): with a loss
profile (the default calibration) to the allocation the profile's costs give at that
budget, as if the server ran at it; otherwise keeping the per-layer shape of the
server's ratios. ``kv_budget: 1`` keeps the request's whole prompt cache. Bad values
are rejected where vLLM validates sampling parameters, which the OpenAI server answers
with HTTP 400. Only the key this project owns
(``kv_budget``) is read: ``extra_args`` is shared with vLLM itself
(``kv_transfer_params`` for KV connectors) and with other plugins, so any other key,
``kv_``-prefixed or not, passes through untouched. Without ``--kv-policy`` the plugin
does not look at requests at all (``plugin``), as stock vLLM.

The scheduler (which frees blocks) and the worker (which compacts) each read the
budget from the request's own sampling parameters and agree through
``kept_prompt_blocks``, like the server-wide settings.
"""

from __future__ import annotations

import math
from typing import Any


def request_budget(extra_args: dict[str, Any] | None) -> float | None:
    """The request's own budget (``None``: the server's); ``ValueError`` for a bad ``kv_budget``."""
    budget = (extra_args or {}).get("kv_budget")
    if budget is None:
        return None
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget) or not 0 < budget <= 1:
        raise ValueError(f"kv_budget must be a number in (0, 1], got {budget!r}")
    return float(budget)


def budget_of(sampling_params) -> float | None:
    """``request_budget`` of a request's sampling parameters (``None`` for pooling requests)."""
    return request_budget(getattr(sampling_params, "extra_args", None))


class SchedulerBudgets:
    """Scheduler-process view: request id -> own budget, from admission until the request is freed."""

    def __init__(self) -> None:
        self._budgets: dict[str, float] = {}

    def admit(self, request_id: str, budget: float | None) -> None:
        if budget is None:
            self._budgets.pop(request_id, None)
        else:
            self._budgets[request_id] = budget

    def release(self, request_id: str) -> None:
        self._budgets.pop(request_id, None)

    def get(self, request_id: str) -> float | None:
        return self._budgets.get(request_id)

    def __len__(self) -> int:
        return len(self._budgets)


SCHEDULER_BUDGETS = SchedulerBudgets()
