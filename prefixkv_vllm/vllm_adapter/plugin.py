"""The ``vllm.general_plugins`` entry point (plugin name: ``prefixkv``).

vLLM calls ``register()`` in every process it starts: the API server, the
engine core and each worker. It must stay idempotent and cheap. It

* adds the ``--kv-*`` flags and folds them into ``additional_config``;
* checks the settings and resolves the per-layer keep ratios once, when the
  engine config is created (so every process sees the same ratios);
* registers the KV-cache spec and manager that free evicted blocks;
* overrides the CPU attention backend, which does nothing new unless a policy
  is active;
* wraps two model-runner methods: per-layer specs, and publishing prompt
  lengths (and per-request budgets) to the attention-metadata builders;
* validates per-request options (``vllm_xargs``) where vLLM validates sampling
  parameters, and tracks each request's budget in the scheduler.
"""

from __future__ import annotations

import argparse
import functools

from .config import PrefixKVConfig, PrefixKVConfigError

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    _registered = True
    _add_cli_flags()
    _resolve_at_engine_config()
    _register_kv_spec()
    _register_attention_backends()
    _wrap_model_runner()
    _handle_request_options()


# --- CLI ---------------------------------------------------------------------


def _budget(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _add_flags(parser):
    from ..policy import POLICY_NAMES, SCORERS
    from ..policy.paged import DECODE_MODES

    group = parser.add_argument_group("PrefixKV", "Per-layer KV-cache budgets after prefill (prefixkv-vllm)")
    group.add_argument("--kv-policy", choices=POLICY_NAMES, default=argparse.SUPPRESS, help="KV eviction policy (default: none, stock vLLM)")
    group.add_argument("--kv-budget", type=_budget, default=argparse.SUPPRESS, help="mean fraction of prompt KV kept across layers, in (0, 1] (default 0.2)")
    group.add_argument("--kv-profile", default=argparse.SUPPRESS, help="JSON profile of per-layer keep ratios (prefixkv); without one, ratios are calibrated at start-up and cached")
    group.add_argument("--kv-scorer", choices=list(SCORERS), default=argparse.SUPPRESS, help="token importance score (default: window)")
    group.add_argument("--kv-window", type=int, default=argparse.SUPPRESS, help="queries the window scorer reads (default 32)")
    group.add_argument("--kv-sink", type=int, default=argparse.SUPPRESS, help="first prompt tokens always kept (default 1)")
    group.add_argument("--kv-recent", type=int, default=argparse.SUPPRESS, help="last prompt tokens always kept (default 64)")
    group.add_argument("--kv-per-kv-head", action="store_true", default=argparse.SUPPRESS, help="select tokens per KV head instead of per layer")
    group.add_argument("--kv-decode", choices=DECODE_MODES, default=argparse.SUPPRESS, help="eviction while decoding: fifo (default), scored, or off")
    group.add_argument("--kv-decode-interval", type=int, default=argparse.SUPPRESS, help="generated tokens between decode-time eviction rounds, a multiple of the block size (default 128)")
    group.add_argument("--kv-admission", choices=("reserve", "stock"), default=argparse.SUPPRESS, help="reserve: admit only requests whose peak KV fits beside the running ones' (default); stock: vLLM's rule")
    group.add_argument("--kv-tiers", type=int, default=argparse.SUPPRESS, help="KV-cache groups for the per-layer ratios (0: one per layer, the default)")
    return parser


_FLAGS = ("kv_policy", "kv_budget", "kv_profile", "kv_scorer", "kv_window", "kv_sink", "kv_recent", "kv_per_kv_head", "kv_tiers", "kv_decode", "kv_decode_interval", "kv_admission")


def _add_cli_flags() -> None:
    from vllm.engine.arg_utils import EngineArgs

    original_add = EngineArgs.add_cli_args
    original_from = EngineArgs.from_cli_args.__func__

    def add_cli_args(parser, *args, **kwargs):
        parser = original_add(parser, *args, **kwargs)
        if not any(a.dest == "kv_policy" for a in parser._actions):
            _add_flags(parser)
        return parser

    def from_cli_args(cls, args):
        engine_args = original_from(cls, args)
        # Flag names double as additional_config keys; unset flags leave it alone.
        flags = {name: getattr(args, name) for name in _FLAGS if hasattr(args, name)}
        if flags:
            additional = dict(engine_args.additional_config or {})
            additional.update(flags)
            engine_args.additional_config = additional
        return engine_args

    EngineArgs.add_cli_args = staticmethod(add_cli_args)
    EngineArgs.from_cli_args = classmethod(from_cli_args)


# --- start-up: check the settings, resolve ratios, configure the engine -------


def _resolve_at_engine_config() -> None:
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.create_engine_config

    @functools.wraps(original)
    def create_engine_config(self, *args, **kwargs):
        vllm_config = original(self, *args, **kwargs)
        from .startup import configure_engine

        configure_engine(vllm_config)
        return vllm_config

    EngineArgs.create_engine_config = create_engine_config


# --- KV-cache spec and manager -------------------------------------------------


def _register_kv_spec() -> None:
    from vllm.v1.core.single_type_kv_cache_manager import register_all_kvcache_specs
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    from .kv_spec import PrefixKVAttentionManager, PrefixKVAttentionSpec

    # The registry skips its built-ins once anything is registered: add them first.
    register_all_kvcache_specs(None)
    KVCacheSpecRegistry.register(
        PrefixKVAttentionSpec, PrefixKVAttentionManager, uniform_type_base_spec=PrefixKVAttentionSpec
    )


# --- attention backends --------------------------------------------------------


def _register_attention_backends() -> None:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    # The CPU platform always resolves CPU_ATTN; overriding the member is the way in.
    # Both wrappers behave as stock unless a policy is active.
    register_backend(AttentionBackendEnum.CPU_ATTN, "prefixkv_vllm.vllm_adapter.backends.cpu_attn.PrefixKVCPUBackend")
    # On CUDA, users opt in with --attention-backend CUSTOM.
    register_backend(
        AttentionBackendEnum.CUSTOM, "prefixkv_vllm.vllm_adapter.backends.flash_attn.PrefixKVFlashAttentionBackend"
    )


# --- model runner --------------------------------------------------------------


def _wrap_model_runner() -> None:
    import numpy as np
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from .backends.core import publish_device_starts
    from .request_options import budget_of
    from .startup import layer_specs
    from .worker_state import STORE, BatchInfo, publish_batch

    original_specs = GPUModelRunner.get_kv_cache_spec
    original_build = GPUModelRunner._build_attention_metadata

    @functools.wraps(original_specs)
    def get_kv_cache_spec(self):
        specs = original_specs(self)
        config = _config_of(self)
        return layer_specs(specs, config) if config.active else specs

    @functools.wraps(original_build)
    def _build_attention_metadata(self, *args, **kwargs):
        config = _config_of(self)
        if not config.active:
            return original_build(self, *args, **kwargs)
        batch = self.input_batch
        num_reqs = batch.num_reqs
        STORE.retain(batch.req_id_to_index)
        req_ids = list(batch.req_ids[:num_reqs])
        budgets = [budget_of(self.requests[r].sampling_params, config) for r in req_ids]
        info = BatchInfo(
            req_ids=req_ids,
            prompt_lens=batch.num_prompt_tokens[:num_reqs].copy(),
            request_budgets=np.array([np.nan if b is None else b for b in budgets]),
        )
        specs = [group.kv_cache_spec for group in self.kv_cache_config.kv_cache_groups]
        info = publish_device_starts(info, specs, batch.num_computed_tokens_cpu[:num_reqs].astype(np.int64), self.device)
        with publish_batch(info):
            return original_build(self, *args, **kwargs)

    GPUModelRunner.get_kv_cache_spec = get_kv_cache_spec
    GPUModelRunner._build_attention_metadata = _build_attention_metadata


# --- per-request options ---------------------------------------------------------


def _config_of(owner) -> PrefixKVConfig:
    """The settings of a vLLM object with a ``vllm_config``, parsed once per object."""
    config = owner.__dict__.get("_prefixkv_config")
    if config is None:
        config = owner._prefixkv_config = PrefixKVConfig.from_additional_config(owner.vllm_config.additional_config)
    return config


def _handle_request_options() -> None:
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import SamplingParams
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.engine.input_processor import InputProcessor
    from vllm.v1.request import RequestStatus

    from .admission import Admission
    from .request_options import SCHEDULER_BUDGETS, budget_of

    original_validate = InputProcessor._validate_params
    original_init = Scheduler.__init__
    original_add = Scheduler.add_request
    original_free = Scheduler._free_request
    original_allocate = KVCacheManager.allocate_slots

    @functools.wraps(original_validate)
    def _validate_params(self, params, *args, **kwargs):
        result = original_validate(self, params, *args, **kwargs)
        if isinstance(params, SamplingParams) and params.extra_args:
            try:
                budget_of(params, _config_of(self))
            except ValueError as exc:  # vLLM answers VLLMValidationError with HTTP 400
                raise VLLMValidationError(str(exc), parameter="vllm_xargs") from None
        return result

    @functools.wraps(original_init)
    def __init__(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        config = _config_of(self)
        if config.active and config.admission == "reserve":
            self.kv_cache_manager._prefixkv_admission = Admission(
                self.kv_cache_config, self.running, self.vllm_config.model_config.max_model_len
            )

    @functools.wraps(original_allocate)
    def allocate_slots(self, request, num_new_tokens, *args, **kwargs):
        admission = self.__dict__.get("_prefixkv_admission")
        if admission is not None and request.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED):
            kwargs["reserved_blocks"] = kwargs.get("reserved_blocks", 0) + admission.reserved_for(request, num_new_tokens)
        return original_allocate(self, request, num_new_tokens, *args, **kwargs)

    @functools.wraps(original_add)
    def add_request(self, request):
        config = _config_of(self)
        if config.active and request.sampling_params is not None:
            SCHEDULER_BUDGETS.admit(request.request_id, budget_of(request.sampling_params, config))
        return original_add(self, request)

    @functools.wraps(original_free)
    def _free_request(self, request, *args, **kwargs):
        SCHEDULER_BUDGETS.release(request.request_id)
        admission = self.kv_cache_manager.__dict__.get("_prefixkv_admission")
        if admission is not None:
            admission.release(request.request_id)
        return original_free(self, request, *args, **kwargs)

    InputProcessor._validate_params = _validate_params
    Scheduler.__init__ = __init__
    KVCacheManager.allocate_slots = allocate_slots
    Scheduler.add_request = add_request
    Scheduler._free_request = _free_request


__all__ = ["register", "PrefixKVConfigError"]
