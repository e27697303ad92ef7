"""Offline calibration: per-layer keep ratios for a model, as a profile.

Runs the model in transformers with eager attention on calibration prompts,
accumulates each layer's attention per KV head exactly as the ``importance``
op does in serving, applies the chosen scorer, runs the PrefixKV search per
prompt and averages the kept fractions (the paper's offline mode).

The prompts are documents built from the Python standard library's own
docstrings, each followed by an instruction, so calibration needs no download.
``prefixkv calibrate MODEL --budget 0.2 0.5 -o profile.json`` writes a profile;
``vllm serve --kv-policy prefixkv`` without ``--kv-profile`` calls
``cached_calibration`` once per model and settings and caches the result.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import sys
import time
from pathlib import Path

import torch

from ..policy import Profile, average_keep_ratios, importance_curves, make_scorer, search_prefix_config
from ..policy.layers import full_attention_layers
from ..policy.profile import ModelIdentity

RECIPE_VERSION = 1
_DOCUMENT_MODULES = ("argparse", "json", "logging", "pathlib", "subprocess", "threading", "collections", "itertools")
_INSTRUCTIONS = (
    "Summarize the document above in three sentences.",
    "List the main functions the document above describes.",
    "What problem does the module described above solve?",
    "Write one question a new user might ask after reading the document above, and answer it.",
)


def calibration_prompts(tokenizer, num_prompts: int, max_tokens: int) -> list[list[int]]:
    prompts = []
    for index in range(num_prompts):
        module = __import__(_DOCUMENT_MODULES[index % len(_DOCUMENT_MODULES)])
        document = "\n\n".join(
            doc for _, obj in sorted(vars(module).items()) if (doc := inspect.getdoc(obj)) and len(doc) > 200
        )
        instruction = _INSTRUCTIONS[index % len(_INSTRUCTIONS)]
        budget_chars = max_tokens * 3  # keeps the document well inside max_tokens before templating
        messages = [{"role": "user", "content": f"{document[:budget_chars]}\n\n{instruction}"}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if not isinstance(ids, list):
            ids = ids["input_ids"]
        prompts.append(list(ids)[-max_tokens:])
    return prompts


@torch.no_grad()
def layer_attention(model, input_ids: list[int], min_query_pos: int, layers: tuple[int, ...]) -> list[torch.Tensor]:
    """Per layer in ``layers``, the attention each token receives from queries at ``>= min_query_pos``: ``[Hkv, S]``."""
    num_kv_heads = _num_kv_heads(model.config.get_text_config())
    outputs = model(torch.tensor([input_ids]), output_attentions=True, use_cache=False)
    accumulated = []
    for layer in layers:
        probs = outputs.attentions[layer]  # [1, Hq, S, S], softmax of the layer's own scaled logits
        received = probs[0, :, min_query_pos:, :].float().sum(dim=1)  # [Hq, S]
        accumulated.append(received.view(num_kv_heads, -1, received.shape[-1]).mean(dim=1))
    return accumulated


def _num_kv_heads(text_config) -> int:
    return getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads


def calibrate(
    model_path: str,
    budgets: list[float],
    *,
    scorer: str = "window",
    window: int = 32,
    num_prompts: int = 8,
    max_tokens: int = 1024,
) -> Profile:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

    started = time.time()
    tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    config = AutoConfig.from_pretrained(model_path, local_files_only=True)
    # Vision-language models are calibrated on the same text-only prompts (no image data offline).
    text_config = config.get_text_config()
    auto_class = AutoModelForCausalLM if text_config is config else AutoModelForImageTextToText
    model = auto_class.from_pretrained(
        model_path, dtype=torch.float32, attn_implementation="eager", local_files_only=True
    ).eval()
    # Only the full-attention layers are compressed; the others keep vLLM's own cache.
    layers = full_attention_layers(text_config, text_config.num_hidden_layers)
    if not layers:
        raise ValueError(f"{model_path} has no full-attention layers: nothing to calibrate")
    token_scorer = make_scorer(scorer, window=window)
    counts = {budget: [] for budget in budgets}
    lengths = []
    for input_ids in calibration_prompts(tokenizer, num_prompts, max_tokens):
        prompt_len = len(input_ids)
        accumulated = layer_attention(model, input_ids, token_scorer.min_query_pos(prompt_len), layers)
        layer_scores = torch.stack([token_scorer.scores(a, prompt_len)[0] for a in accumulated])
        curves = importance_curves(layer_scores)
        for budget in budgets:
            counts[budget].append(search_prefix_config(curves, budget).tolist())
        lengths.append(prompt_len)
    identity = ModelIdentity(
        name=Path(model_path).name,
        num_layers=len(layers),
        num_kv_heads=_num_kv_heads(text_config),
        head_dim=getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads,
        layers=layers,
    )
    return Profile(
        identity,
        scorer,
        {budget: average_keep_ratios(counts[budget], lengths) for budget in budgets},
        {
            "tool": "prefixkv calibrate",
            "recipe": RECIPE_VERSION,
            "model_path": str(model_path),
            "samples": len(lengths),
            "prompt_tokens": lengths,
            "window": window,
            "seconds": round(time.time() - started, 1),
        },
    )


def cached_calibration(model_path: str, budget: float, scorer: str, window: int) -> Profile:
    """``calibrate`` for one budget, cached on disk by model files and settings."""
    from .demo_model import default_cache_dir

    config_file = Path(model_path) / "config.json"
    identity = config_file.read_bytes() if config_file.exists() else str(model_path).encode()
    key = json.dumps([RECIPE_VERSION, str(Path(model_path).resolve()), budget, scorer, window]).encode()
    digest = hashlib.sha256(key + identity).hexdigest()[:16]
    path = default_cache_dir() / "profiles" / f"{Path(model_path).name}-{digest}.json"
    if path.exists():
        return Profile.load(path)
    profile = calibrate(model_path, [budget], scorer=scorer, window=window)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(f".{os.getpid()}.tmp")
    profile.save(temporary)
    os.replace(temporary, path)
    return profile


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="prefixkv calibrate", description="Write a PrefixKV profile for a model.")
    parser.add_argument("model", help="local Hugging Face checkpoint directory")
    parser.add_argument("--budget", type=float, nargs="+", default=[0.2], help="budgets to calibrate (default 0.2)")
    parser.add_argument("--scorer", default="window", help="token scorer (default window)")
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=8, help="calibration prompts (default 8)")
    parser.add_argument("--max-tokens", type=int, default=1024)
    parser.add_argument("-o", "--output", required=True, help="profile JSON to write")
    args = parser.parse_args(argv)
    profile = calibrate(
        args.model, args.budget, scorer=args.scorer, window=args.window, num_prompts=args.prompts, max_tokens=args.max_tokens
    )
    profile.save(args.output)
    print(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
