"""The package's shape: layers import downward only, no import circles, no process-global request state.

The layers (``docs/design.md``), lowest first: the pure math and the ops; configuration;
calibration and the vLLM adapter; the command-line tools. Imports are read from the source
(function-level ones too), so a lazy import cannot hide a circle.
"""

from __future__ import annotations
import __future__

import ast
import dataclasses
import enum
import importlib
import logging
import types
import typing
from pathlib import Path

import pytest
import torch

import prefixkv_vllm

PACKAGE = Path(prefixkv_vllm.__file__).resolve().parent
LAYERS = (
    ("prefixkv_vllm", "prefixkv_vllm.policy", "prefixkv_vllm.ops"),
    ("prefixkv_vllm.config",),
    ("prefixkv_vllm.calibration", "prefixkv_vllm.vllm_adapter"),
    ("prefixkv_vllm.tools", "prefixkv_vllm.cli", "prefixkv_vllm.vllm_cli"),
)
# Below the adapter nothing may need vLLM: the tools and calibration run without an engine.
WITHOUT_VLLM = ("prefixkv_vllm.policy", "prefixkv_vllm.ops", "prefixkv_vllm.config", "prefixkv_vllm.calibration")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int:
    # The longest matching prefix decides ("prefixkv_vllm" itself is the package's __init__ only).
    matches = [(len(prefix), index) for index, prefixes in enumerate(LAYERS) for prefix in prefixes
               if module == prefix or (prefix != "prefixkv_vllm" and module.startswith(prefix + "."))]  # fmt: skip
    assert matches, f"{module} is in no layer: add it to LAYERS (and docs/design.md)"
    return max(matches)[1]


def imports(module: str) -> set[str]:
    """Every module ``module`` imports, anywhere in its source, resolved to absolute names."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            # `from . import x` imports the submodule x where there is one.
            found.update(f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in MODULES)
    return found


def internal_imports(module: str) -> set[str]:
    return {name for name in imports(module) if name in MODULES and name != module}


def test_every_module_is_in_a_layer():
    for module in MODULES:
        layer_of(module)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_down_or_across_never_up(module):
    upward = sorted(name for name in internal_imports(module) if layer_of(name) > layer_of(module))
    assert not upward, f"{module} (layer {layer_of(module)}) imports higher layers: {upward}"


def test_no_import_circles():
    graph = {module: internal_imports(module) for module in MODULES}
    # A package's __init__ importing its own submodules is how packages re-export: not a circle.
    graph = {m: {n for n in targets if not n.startswith(m + ".") or not MODULES[m].name == "__init__.py"} for m, targets in graph.items()}
    state: dict[str, int] = {}

    def visit(module, trail):
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                circle = trail[trail.index(target):] + [target]
                raise AssertionError(f"import circle: {' -> '.join(circle)}")
            if target not in state:
                visit(target, trail + [target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


@pytest.mark.parametrize("module", [m for m in sorted(MODULES) if m.startswith(WITHOUT_VLLM)])
def test_lower_layers_import_no_vllm(module):
    assert not {name for name in imports(module) if name == "vllm" or name.startswith("vllm.")}


# Module-level values that hold no request state: constants, and what a module defines.
IMMUTABLE = (
    str, bytes, int, float, bool, type(None), tuple, frozenset, types.MappingProxyType, torch.dtype, Path, enum.Enum,
    logging.Logger, logging.LoggerAdapter, typing.TypeVar, __future__._Feature,
)  # fmt: skip


def frozen(value) -> bool:
    return dataclasses.is_dataclass(value) and value.__dataclass_params__.frozen


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_level_mutable_state(module):
    loaded = importlib.import_module(module)
    mutable = {
        name: type(value).__name__
        for name, value in vars(loaded).items()
        if not name.startswith("__")
        and not isinstance(value, (types.ModuleType, type, *IMMUTABLE))
        and not callable(value)
        and not frozen(value)
        # What a module imports from vLLM (its platform object, say) is vLLM's, not ours.
        and (isinstance(value, (dict, list, set, bytearray)) or type(value).__module__.startswith("prefixkv_vllm"))
    }
    assert not mutable, f"{module} keeps mutable module-level values (request state belongs to an owner): {mutable}"

