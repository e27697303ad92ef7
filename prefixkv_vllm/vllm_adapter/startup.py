"""Start-up: check the model and settings, fix the per-layer ratios, build the layer specs."""

from __future__ import annotations

import dataclasses

from vllm.logger import init_logger
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheSpec

from ..config import PrefixKVConfig, PrefixKVConfigError
from ..policy import Profile, ProfileError
from ..policy.costs import ratio_at
from ..policy.layers import describe_layer_kinds, full_attention_layers
from ..policy.paged import evicted_tokens
from .backends import FP8_CACHE_DTYPES
from .compat import vllm_problem
from .kv_spec import PrefixKVAttentionSpec

logger = init_logger("vllm.prefixkv")  # under "vllm" so that vLLM's log handlers show it

UNQUANTIZED_CACHE_DTYPES = ("auto", "float16", "bfloat16", "float32")


def configure_engine(vllm_config) -> None:
    """Validate, resolve ratios into ``additional_config`` and pick the attention backend."""
    config = PrefixKVConfig.from_additional_config(vllm_config.additional_config)
    if not config.active:
        return
    if (problem := vllm_problem()) is not None:
        raise PrefixKVConfigError(problem)
    model_config = vllm_config.model_config
    _check_supported(vllm_config)
    select_attention_backend(vllm_config)
    num_layers = model_config.get_total_num_hidden_layers()  # every stage's: pipeline stages hold a share each
    layers = full_attention_layers(model_config.hf_text_config, num_layers)
    if not layers:
        raise PrefixKVConfigError(
            f"PrefixKV has nothing to compress: {model_config.model} has no full-attention layers "
            f"({describe_layer_kinds(model_config.hf_text_config, num_layers)})"
        )
    if config.layers is not None and config.layers != layers:
        raise PrefixKVConfigError(f"kv_layers {list(config.layers)} are not the model's full-attention layers {list(layers)}")
    config = dataclasses.replace(config, layers=layers)
    hybrid = len(layers) < num_layers
    if config.tiers and len(layers) % config.tiers:
        raise PrefixKVConfigError(f"--kv-tiers {config.tiers} must divide the model's {_layer_count(layers, num_layers)} evenly")
    if config.keep_ratios is None:
        config = config.with_keep_ratios(*_keep_ratios(config, vllm_config, layers))
    elif len(config.keep_ratios) != len(layers):
        raise PrefixKVConfigError(f"kv_keep_ratios has {len(config.keep_ratios)} entries for {_layer_count(layers, num_layers)}")
    given = "kv_decode_interval" in (vllm_config.additional_config or {})
    interval = _decode_interval(config, vllm_config.cache_config.block_size, given)
    config = dataclasses.replace(config, decode_interval=interval)
    if (len(set(config.keep_ratios)) > 1 or hybrid) and vllm_config.scheduler_config.disable_hybrid_kv_cache_manager:
        what = "a model with sliding-window or other local layers" if hybrid else "per-layer KV budgets"
        raise PrefixKVConfigError(f"PrefixKV on {what} needs vLLM's hybrid KV-cache manager; drop --disable-hybrid-kv-cache-manager")
    vllm_config.additional_config = {**(vllm_config.additional_config or {}), **config.to_additional_config()}
    _log_plan(config, vllm_config.cache_config.block_size, num_layers)
    if vllm_config.cache_config.enable_prefix_caching:
        logger.info(
            "PrefixKV: prefix caching stays on; a request shares (and reuses) at most the first %.0f%% of its "
            "prompt at budget %g, the part no layer rewrites",
            100 * (1 - config.budget),
            config.budget,
        )


def _decode_interval(config: PrefixKVConfig, block_size: int | None, given: bool) -> int:
    """Tokens between decode rounds: the interval given, which must be whole blocks, or the default rounded up to them."""
    interval = config.decode_interval
    if not block_size or interval % block_size == 0:
        return interval
    if given and config.decode != "off":
        raise PrefixKVConfigError(f"--kv-decode-interval {interval} must be a multiple of the block size {block_size}")
    return -(-interval // block_size) * block_size


def _layer_count(layers: tuple[int, ...], num_layers: int) -> str:
    if len(layers) == num_layers:
        return f"{num_layers} layers"
    return f"{len(layers)} full-attention layers"


def _check_supported(vllm_config) -> None:
    model_config = vllm_config.model_config
    reasons = []
    if model_config.is_encoder_decoder:
        reasons.append("encoder-decoder models")
    if model_config.use_mla:
        reasons.append("MLA attention")
    if vllm_config.speculative_config is not None:
        reasons.append("speculative decoding")
    cache_dtype = str(vllm_config.cache_config.cache_dtype)
    if cache_dtype not in UNQUANTIZED_CACHE_DTYPES and cache_dtype not in FP8_CACHE_DTYPES:
        # Compaction moves any bytes; scoring reads keys with one scale per tensor, not per token or block.
        reasons.append(f"--kv-cache-dtype {cache_dtype} (fp8, fp8_e4m3 and fp8_e5m2 are supported)")
    if vllm_config.use_v2_model_runner:
        reasons.append("Model Runner V2 (set VLLM_USE_V2_MODEL_RUNNER=0)")
    if vllm_config.scheduler_config.async_scheduling:
        # Never run with it: the layout contract assumes the scheduler frees blocks only after the
        # step that last read them was scheduled and run (policy.paged, invariant 2).
        reasons.append("async scheduling (vLLM's default on GPUs: add --no-async-scheduling)")
    # Each of these makes the scheduler's block accounting and the worker's compaction
    # disagree: they see other layers, other prompt lengths or other positions.
    # (Cascade attention needs no check: vLLM 0.32 removed it.)
    if model_config.uses_alibi:
        reasons.append("ALiBi models (compaction moves keys; ALiBi biases by cache index)")
    if vllm_config.kv_transfer_config is not None:
        reasons.append("KV connectors (--kv-transfer-config)")
    parallel = vllm_config.parallel_config
    if parallel.decode_context_parallel_size > 1 or parallel.prefill_context_parallel_size > 1:
        reasons.append("context parallelism")
    if parallel.use_ubatching:
        reasons.append("dual-batch overlap / micro-batching")
    if reasons:
        raise PrefixKVConfigError(f"PrefixKV does not support {', '.join(reasons)} ({model_config.model})")


def select_attention_backend(vllm_config) -> None:
    """Full-attention layers run the platform's PrefixKV backend (``backends``)."""
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum
    from vllm.v1.kv_cache_interface import KVCacheSpecKind

    from .backends import backend_path

    if backend_path(current_platform) is None:
        raise PrefixKVConfigError(f"PrefixKV has no attention backend for the {current_platform.device_name} platform")
    attention = vllm_config.attention_config
    kind = KVCacheSpecKind.FULL_ATTENTION.value
    chosen = attention.backend_per_kind.get(kind, attention.backend)
    if chosen not in (None, AttentionBackendEnum.CUSTOM):
        raise PrefixKVConfigError(
            f"PrefixKV runs its own attention backend (CUSTOM, wrapping the stock one); drop --attention-backend {chosen.name}"
        )
    attention.backend_per_kind = {**attention.backend_per_kind, kind: AttentionBackendEnum.CUSTOM}


def _keep_ratios(config: PrefixKVConfig, vllm_config, layers: tuple[int, ...]) -> tuple[tuple[float, ...], tuple | None]:
    """One keep ratio per compressed layer, in the order of ``layers``, and, from a loss
    profile, each layer's ratio curve over request budgets (else None)."""
    model_config = vllm_config.model_config
    if config.profile is not None:
        try:
            profile = Profile.load(config.profile)
            profile.check_model(layers, model_config.get_total_num_kv_heads(), model_config.get_head_size())
            return profile.keep_ratios(config.budget), profile.ratio_curves()
        except ProfileError as exc:
            raise PrefixKVConfigError(f"--kv-profile {config.profile}: {exc}") from None
    if config.policy in ("uniform", "streaming") or config.budget >= 1.0:
        return (config.budget,) * len(layers), None  # a full budget keeps every layer whole: nothing to calibrate
    from ..calibration import cached_calibration

    try:
        profile = cached_calibration(model_config.model, config.budget, config)
    except ValueError as exc:  # a budget the loss criterion has not measured
        raise PrefixKVConfigError(f"--kv-criterion {config.criterion}: {exc}") from None
    profile.check_model(layers, model_config.get_total_num_kv_heads(), model_config.get_head_size())
    return profile.keep_ratios(config.budget), profile.ratio_curves()


def _log_plan(config: PrefixKVConfig, block_size: int, num_layers: int) -> None:
    ratios = config.keep_ratios
    reference_prompt = 2048
    evicted = sum(evicted_tokens(reference_prompt, r, block_size, config.sink, config.recent) for r in ratios)
    saving = evicted / (reference_prompt * len(ratios))
    if len(config.layers) == num_layers:
        compressed = f"all {num_layers} layers"
    else:
        others = num_layers - len(config.layers)
        compressed = (
            f"the {len(config.layers)} full-attention layers {' '.join(map(str, config.layers))} of {num_layers} "
            f"(the other {others} keep vLLM's own KV cache)"
        )
    if config.profile is not None:
        allocation = f"profile {config.profile}"
    elif config.policy == "prefixkv" and config.budget < 1.0:
        allocation = f"calibrated ({config.criterion} criterion)"
    else:
        allocation = "uniform"
    requests = "from the loss costs" if config.ratio_curves else "rescaled"
    logger.info(
        "PrefixKV: policy=%s budget=%g scorer=%s allocation=%s (request budgets: %s) decode=%s (every %d tokens); "
        "compressed: %s; keep ratios per layer: %s; a %d-token prompt frees %.0f%% of their KV cache after prefill "
        "(block size %d)",
        config.policy,
        config.budget,
        config.scorer,
        allocation,
        requests,
        config.decode,
        config.decode_interval,
        compressed,
        " ".join(f"{r:.2f}" for r in ratios),
        reference_prompt,
        100 * saving,
        block_size,
    )


def layer_specs(
    specs: dict[str, KVCacheSpec], config: PrefixKVConfig, prefix_caching: bool, stage: range
) -> dict[str, KVCacheSpec]:
    """The model's KV-cache specs with each compressed layer's carrying its (tiered) keep ratio.

    Only the full-attention layers that start-up resolved (``config.layers``) are
    compressed; every other layer (sliding window, chunked local, linear attention)
    keeps the spec vLLM built, and so its own manager and backend. ``stage``: the layers
    this worker's pipeline stage builds (all of them without pipeline parallelism).
    """
    full = {extract_layer_index(name): name for name, spec in specs.items() if type(spec) is FullAttentionSpec}
    planned = [layer for layer in config.layers if layer in stage]
    if sorted(full) != planned:
        raise PrefixKVConfigError(
            f"start-up planned to compress the full-attention layers {planned} of layers {stage.start}-{stage.stop - 1}, "
            f"but the model built full attention in layers {sorted(full)}"
        )
    tiers = _tiers(config.keep_ratios, config.tiers)
    ratios = _tier_means(config.keep_ratios, tiers)
    curves = _tier_curves(config.ratio_curves, tiers) if config.ratio_curves else [()] * len(ratios)
    converted = dict(specs)
    for index, ratio, curve in zip(config.layers, ratios, curves):
        if index not in full:  # another pipeline stage's layer
            continue
        name = full[index]
        converted[name] = PrefixKVAttentionSpec.of(
            specs[name],
            keep_ratio=ratio,
            sink=config.sink,
            recent=config.recent,
            budget=config.budget,
            ratio_curve=curve,
            decode=config.decode,
            interval=config.decode_interval,
            prefix_caching=prefix_caching,
        )
    return converted


def _tiers(ratios: tuple[float, ...], tiers: int) -> list[list[int]]:
    """The layers of each KV-cache group: sorted by ratio and cut into ``tiers`` equal groups (0: one each)."""
    if not tiers or tiers >= len(ratios) or len(set(ratios)) == 1:
        return [[layer] for layer in range(len(ratios))]
    order = sorted(range(len(ratios)), key=lambda layer: ratios[layer])
    size = len(ratios) // tiers
    return [order[start : start + size] for start in range(0, len(order), size)]


def _tier_means(ratios: tuple[float, ...], tiers: list[list[int]]) -> list[float]:
    """Each layer at its tier's mean ratio."""
    tiered = list(ratios)
    for members in tiers:
        mean = sum(ratios[m] for m in members) / len(members)
        for m in members:
            tiered[m] = mean
    return tiered


def _tier_curves(curves, tiers: list[list[int]]) -> list[tuple[tuple[float, float], ...]]:
    """Each layer on its tier's mean curve: the members' mean ratio at the union of their knots,
    so that a request budget moves the tiers as it would move the layers on average."""
    tiered = list(curves)
    for members in tiers:
        if len(members) == 1:
            continue
        budgets = sorted({b for m in members for b, _ in curves[m]})
        mean = tuple((b, sum(ratio_at(curves[m], b) for m in members) / len(members)) for b in budgets)
        for m in members:
            tiered[m] = mean
    return tiered
