"""``LLM.generate`` through vLLM's FlashAttention backend on the CPU, stock and with PrefixKV (a script).

Run by ``test_flash_attn_cpu.py`` in a fresh interpreter, because everything here is
process-wide: the engine core and its worker run in this process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so that the pure-torch stand-ins for FlashAttention's
CUDA calls (``flash_attn_reference``) reach the worker, and the CPU platform is made to honour
``--attention-backend FLASH_ATTN`` and ``CUSTOM``, which it otherwise ignores. A 3-layer Llama
with random bf16 weights, built here, is served twice: by vLLM's own FlashAttention backend
(``FLASH_ATTN``, no policy), then with PrefixKV (``backends.BACKENDS`` points the CPU platform at PrefixKV's FlashAttention
backend, which the plugin then registers as CUSTOM in the worker, as it does on CUDA).
Prints one JSON line: each run's greedy tokens, and what PrefixKV's impl saw.

Usage: ``python tests/flash_attn_engine_run.py MODEL_DIR``
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections import Counter
from pathlib import Path

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ["HF_HUB_OFFLINE"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import vllm.v1.attention.backends.flash_attn as vllm_flash_attn  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from vllm import LLM, SamplingParams  # noqa: E402
from vllm.platforms.cpu import CpuPlatform  # noqa: E402
from vllm.v1.attention.backends.registry import AttentionBackendEnum  # noqa: E402

from prefixkv_vllm.vllm_adapter import backends  # noqa: E402
from prefixkv_vllm.vllm_adapter.backends.flash_attn import PrefixKVFlashAttentionImpl  # noqa: E402
from tests import flash_attn_reference as reference  # noqa: E402
from tests.random_models import save_random_model  # noqa: E402

PROMPTS = [(100, None), (70, 0.25), (90, 1.0)]  # (length, kv_budget)
MAX_TOKENS = 64


def build_model(path: Path) -> None:
    config = LlamaConfig(
        vocab_size=128, hidden_size=256, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        head_dim=64, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    save_random_model(LlamaForCausalLM, config, path, torch.bfloat16)


def use_stand_ins() -> None:
    for name in ("reshape_and_cache_flash", "flash_attn_varlen_func", "get_scheduler_metadata"):
        setattr(vllm_flash_attn, name, getattr(reference, name))
    vllm_flash_attn.get_flash_attn_version = lambda *args, **kwargs: 3  # an H100/H200's answer

    original = CpuPlatform.get_attn_backend_cls.__func__

    @functools.wraps(original)  # start-up checks vLLM's signatures, through wrappers
    def get_attn_backend_cls(cls, selected_backend, *args, **kwargs):
        if selected_backend in (AttentionBackendEnum.FLASH_ATTN, AttentionBackendEnum.CUSTOM):
            return selected_backend.get_path()
        return original(cls, selected_backend, *args, **kwargs)

    CpuPlatform.get_attn_backend_cls = classmethod(get_attn_backend_cls)


def watch_prefixkv_impl(seen: Counter) -> None:
    """Count, per layer, the steps PrefixKV's impl ran and compacted; its outputs must be finite."""
    original = PrefixKVFlashAttentionImpl.forward

    @functools.wraps(original)
    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
        result = original(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
        if attn_metadata is not None:
            assert torch.isfinite(result[: attn_metadata.num_actual_tokens]).all(), f"{layer.layer_name}: non-finite attention"
            seen[layer.layer_name, "steps"] += 1
            work = getattr(attn_metadata, "prefixkv", None)
            seen[layer.layer_name, "compactions"] += work is not None and work.compact is not None
        return result

    PrefixKVFlashAttentionImpl.forward = forward


def generate(llm: LLM) -> list[list[int]]:
    prompts, params = [], []
    for length, budget in PROMPTS:
        tokens = torch.randint(3, 128, (length,), generator=torch.Generator().manual_seed(length)).tolist()
        prompts.append({"prompt_token_ids": tokens})
        extra = None if budget is None else {"kv_budget": budget}
        params.append(SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, extra_args=extra))
    return [list(out.outputs[0].token_ids) for out in llm.generate(prompts, params, use_tqdm=False)]


def main(model_dir: str) -> None:
    path = Path(model_dir)
    if not (path / "config.json").exists():
        build_model(path)
    use_stand_ins()
    engine = dict(
        model=str(path), skip_tokenizer_init=True, dtype="bfloat16", block_size=16, enforce_eager=True, max_model_len=256,
        max_num_batched_tokens=64, max_num_seqs=4,
    )  # fmt: skip

    stock = LLM(**engine, attention_backend="FLASH_ATTN")
    stock_tokens = generate(stock)
    del stock

    backends.BACKENDS = {**backends.BACKENDS, "cpu": backends.BACKENDS["cuda"]}  # the CPU platform runs PrefixKV's FlashAttention
    seen: Counter = Counter()
    watch_prefixkv_impl(seen)
    prefixkv = LLM(**engine, additional_config={
        "kv_policy": "uniform", "kv_budget": 0.5, "kv_keep_ratios": [0.2, 0.3, 1.0], "kv_decode": "fifo", "kv_decode_interval": 16,
        "kv_window": 8, "kv_recent": 8, "kv_scorer": "window",
    })  # fmt: skip
    prefixkv_tokens = generate(prefixkv)
    print(json.dumps({
        "stock": stock_tokens, "prefixkv": prefixkv_tokens, "budgets": [budget for _, budget in PROMPTS],
        "layers": {f"{name}:{what}": count for (name, what), count in sorted(seen.items())},
    }))  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1])
