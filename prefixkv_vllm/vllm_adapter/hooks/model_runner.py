"""The model runner (``GPUModelRunner``, which ``CPUModelRunner`` inherits): layer specs, backends, the runner's PrefixKV state, the step's compactions after its forward."""

from __future__ import annotations

import numpy as np

from ...config import PrefixKVConfig
from ..worker_state import BatchInfo, WorkerState


def install() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from . import bind_when_active

    bind_when_active(GPUModelRunner, bind_model_runner)


def bind_model_runner(runner, config: PrefixKVConfig) -> WorkerState:
    """Binds the runner's hooks around a ``WorkerState`` it owns (returned for tests)."""
    from ..backends import attach_state, use_prefixkv_backend
    from ..backends.core import publish_device_starts
    from ..request_options import budget_of
    from ..startup import layer_specs, logger

    use_prefixkv_backend()
    state = WorkerState(mean_over_ranks=_mean_over_ranks if runner.parallel_config.tensor_parallel_size > 1 else None)
    original_specs = runner.get_kv_cache_spec
    original_init_cache = runner.initialize_kv_cache
    original_update = runner._update_states
    original_build = runner._build_attention_metadata
    original_forward = runner._model_forward

    def get_kv_cache_spec():
        stage = range(*runner.model_config.get_layers_start_end_indices(runner.parallel_config))
        return layer_specs(original_specs(), config, runner.cache_config.enable_prefix_caching, stage)

    def initialize_kv_cache(*args, **kwargs):
        result = original_init_cache(*args, **kwargs)
        for backend, layers in attach_state(runner.attn_groups, state).items():
            logger.info("PrefixKV: %d compressed layers run %s", layers, backend)
        return result

    def _update_states(scheduler_output):
        state.store.drop(scheduler_output.finished_req_ids)
        state.store.drop(scheduler_output.preempted_req_ids or ())
        return original_update(scheduler_output)

    def _build_attention_metadata(*args, **kwargs):
        batch = runner.input_batch
        num_reqs = batch.num_reqs
        req_ids = list(batch.req_ids[:num_reqs])
        budgets = [budget_of(runner.requests[r].sampling_params) for r in req_ids]
        info = BatchInfo(
            req_ids=req_ids,
            prompt_lens=batch.num_prompt_tokens[:num_reqs].copy(),
            request_budgets=np.array([np.nan if b is None else b for b in budgets]),
        )
        specs = [group.kv_cache_spec for group in runner.kv_cache_config.kv_cache_groups]
        state.batch = publish_device_starts(info, specs, batch.num_computed_tokens_cpu[:num_reqs].astype(np.int64), runner.device)
        try:
            return original_build(*args, **kwargs)
        finally:
            state.batch = None

    def _model_forward(*args, **kwargs):
        # Every layer has read its cache: the step's compactions, all layers at once.
        output = original_forward(*args, **kwargs)
        state.moves.flush()
        return output

    runner.get_kv_cache_spec = get_kv_cache_spec
    runner.initialize_kv_cache = initialize_kv_cache
    runner._update_states = _update_states
    runner._build_attention_metadata = _build_attention_metadata
    runner._model_forward = _model_forward
    return state


def _mean_over_ranks(scores):
    """The mean of each rank's ``scores`` over the tensor-parallel group (every rank holds as many KV heads)."""
    from vllm.distributed import get_tp_group

    group = get_tp_group()
    return group.all_reduce(scores) / group.world_size
