"""Which layers of a model PrefixKV compresses: its full-attention layers.

Hybrid models mix attention types (Gemma 2 and 3: five sliding-window layers to
one global; gpt-oss: alternating; Llama 4: chunked local attention; linear-attention
hybrids). Their full-attention layers hold almost all of the KV cache at long
context; the others keep vLLM's own cache, which already frees old blocks. Reads a
transformers text config only (no vLLM import), so calibration and start-up agree.
"""

from __future__ import annotations

# ``layer_types`` spellings of layers with a full-attention KV cache (transformers'
# configs: Gemma 2/3, gpt-oss, Cohere 2, Llama 4, Qwen 3.5 and other hybrids).
FULL_ATTENTION_TYPES = ("full_attention", "attention")


def full_attention_layers(text_config, num_layers: int) -> tuple[int, ...]:
    """Indices of the layers PrefixKV compresses: those with full attention.

    vLLM's model files read ``layer_types`` to give a layer a sliding window
    (``SlidingWindowSpec``), chunked-local or linear attention. A ``sliding_window``
    without ``layer_types`` (Mistral style) counts as every layer sliding. The
    worker checks the result against the KV-cache specs the model actually built
    (``vllm_adapter.startup.layer_specs``).
    """
    layer_types = getattr(text_config, "layer_types", None)
    if layer_types is not None:
        return tuple(i for i, kind in enumerate(layer_types[:num_layers]) if kind in FULL_ATTENTION_TYPES)
    if getattr(text_config, "sliding_window", None) is not None:
        return ()
    return tuple(range(num_layers))


def describe_layer_kinds(text_config, num_layers: int) -> str:
    """The model's layer kinds in a few words, for a start-up error."""
    layer_types = getattr(text_config, "layer_types", None)
    if layer_types is None:
        return f"every layer has a sliding window of {text_config.sliding_window} tokens"
    kinds = list(layer_types[:num_layers])
    return "layer types: " + ", ".join(f"{kinds.count(kind)} {kind}" for kind in dict.fromkeys(kinds))
