"""A small vision-language checkpoint to run vLLM's image path against: Idefics3 (SmolVLM's architecture).

No vision-language weights can be fetched here, so the vision tower and the connector
are random (seeded, so every build is identical). The language model is the demo
SmolLM2-135M-Instruct (``text="demo"``: coherent text) or a random 2-layer Llama
(``text="tiny"``: fast, for tests). What is real is the path an image takes: a chat
request with an ``image_url``, transformers' PIL image processor (no torchvision
needed), vLLM's Idefics3 model, and 64 ``<image>`` tokens per image in the prompt,
which PrefixKV scores and evicts like any other prompt token. What the model says
about an image's content means nothing.

Command line: ``prefixkv demo-vlm [--text tiny]`` prints the path (built on first use).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..config import default_cache_dir
from .demo_model import demo_model_path
from .model_cache import cached_build

IMAGE_SIZE, PATCH_SIZE, SCALE_FACTOR = 256, 16, 2
IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2 // SCALE_FACTOR**2  # per image: 256 patches, pixel-shuffled by 2x2
TEXT_MODELS = ("demo", "tiny")
_SPECIAL_TOKENS = ("<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>")
_RECIPE_VERSION = 1


def demo_vlm_path(text: str = "demo", cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The checkpoint directory ``<cache>/SmolVLM-demo-<text>``, built on first use."""
    if text not in TEXT_MODELS:
        raise ValueError(f"text must be one of {TEXT_MODELS}, got {text!r}")
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()

    def build(staged: Path, scratch: Path) -> None:
        _build(staged, demo_model_path(cache), text)  # the demo's tokenizer always, its weights for text="demo"

    return cached_build(cache / f"SmolVLM-demo-{text}", _RECIPE_VERSION, build, {"text": text})


def _build(dest: Path, text_model: Path, text: str) -> None:
    import torch
    from safetensors.torch import load_file
    from transformers import (
        AutoTokenizer,
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessorPil,
        Idefics3Processor,
        Idefics3VisionConfig,
        LlamaConfig,
    )

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(text_model)
    tokenizer.add_special_tokens({"additional_special_tokens": list(_SPECIAL_TOKENS)})
    vocab_size = (len(tokenizer) + 63) // 64 * 64
    if text == "demo":
        text_config = LlamaConfig.from_pretrained(text_model)
        text_config.vocab_size = vocab_size
    else:
        text_config = LlamaConfig(
            vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, head_dim=64,  # a head size vLLM's CPU attention has
            max_position_embeddings=4096, tie_word_embeddings=True, rms_norm_eps=1e-5,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip
    vision_config = Idefics3VisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        image_size=IMAGE_SIZE, patch_size=PATCH_SIZE,
    )  # fmt: skip
    config = Idefics3Config(
        vision_config=vision_config,
        text_config=text_config,
        scale_factor=SCALE_FACTOR,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=text_config.tie_word_embeddings,
    )
    model = Idefics3ForConditionalGeneration(config).float()
    if text == "demo":
        weights = load_file(str(text_model / "model.safetensors"))
        language_model = model.model.text_model
        embeddings = weights.pop("model.embed_tokens.weight").float()
        with torch.no_grad():
            language_model.embed_tokens.weight[: embeddings.shape[0]] = embeddings  # new special tokens stay random
        result = language_model.load_state_dict(
            {name.removeprefix("model."): w.float() for name, w in weights.items() if name.startswith("model.")},
            strict=False,
        )
        if result.unexpected_keys or set(result.missing_keys) != {"embed_tokens.weight"}:
            raise RuntimeError(f"demo text weights do not fit: {result}")
        model.tie_weights()
    model.to(torch.bfloat16).save_pretrained(dest)
    # No image splitting: every image is resized to one IMAGE_SIZE tile, IMAGE_TOKENS tokens.
    image_processor = Idefics3ImageProcessorPil(
        do_image_splitting=False, size={"longest_edge": IMAGE_SIZE}, max_image_size={"longest_edge": IMAGE_SIZE}
    )
    processor = Idefics3Processor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_len=IMAGE_TOKENS, chat_template=tokenizer.chat_template
    )
    processor.save_pretrained(dest)
    tokenizer.save_pretrained(dest)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="prefixkv demo-vlm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--text", choices=TEXT_MODELS, default="demo", help="language model: the demo SmolLM2 or a tiny random one")
    parser.add_argument("--cache-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    print(demo_vlm_path(args.text, args.cache_dir))
    return 0
