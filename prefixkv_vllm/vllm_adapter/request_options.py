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
``kept_prompt_blocks``, like the server-wide settings. In the scheduler process the
scheduler hook keeps each request's budget in a ``SchedulerBudgets`` it owns and
hands to the KV-cache managers and to admission.
"""

from __future__ import annotations

from typing import Any

from ..policy.budget import check_budget


def request_budget(extra_args: dict[str, Any] | None) -> float | None:
    """The request's own budget (``None``: the server's); ``ValueError`` for a bad ``kv_budget``."""
    budget = (extra_args or {}).get("kv_budget")
    if budget is None:
        return None
    try:
        return check_budget(budget)
    except ValueError as exc:
        raise ValueError(f"kv_budget {exc}") from None


def budget_of(sampling_params) -> float | None:
    """``request_budget`` of a request's sampling parameters (``None`` for pooling requests)."""
    return request_budget(getattr(sampling_params, "extra_args", None))


class SchedulerBudgets:
    """Request id -> own budget, from admission until the request is freed (one per scheduler, ``hooks.scheduler``)."""

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

