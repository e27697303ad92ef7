"""Checkpoints with random weights for end-to-end tests, with decisive logits."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def demo_tokenizer_into(path: Path) -> dict:
    """Copies the demo model's tokenizer into ``path``; returns the demo model's config."""
    from prefixkv_vllm.tools.demo_model import demo_model_path

    demo = demo_model_path()
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        (path / name).write_bytes((demo / name).read_bytes())
    return json.loads((demo / "config.json").read_text())


def save_random_model(model_class, config, path: Path, dtype: torch.dtype = torch.float32) -> None:
    torch.manual_seed(0)
    model = model_class(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.2)  # decisive logits: greedy tokens without near-ties
    model.to(dtype).save_pretrained(path, safe_serialization=True)
