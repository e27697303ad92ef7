"""The plugin's hooks into vLLM, without an engine: inert without a policy, version
range, start-up refusals, backend selection and check, score lifetime."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("vllm")

import vllm  # noqa: E402
from vllm.config import AttentionConfig  # noqa: E402
from vllm.exceptions import VLLMValidationError  # noqa: E402
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend  # noqa: E402
from vllm.v1.attention.backends.registry import AttentionBackendEnum  # noqa: E402
from vllm.v1.kv_cache_interface import FullAttentionSpec  # noqa: E402

from prefixkv_vllm.config import PrefixKVConfig, PrefixKVConfigError  # noqa: E402
from prefixkv_vllm.vllm_adapter import backends, compat, startup  # noqa: E402
from prefixkv_vllm.vllm_adapter.backends.cpu_attn import PrefixKVCPUBackend  # noqa: E402
from prefixkv_vllm.vllm_adapter.hooks import bind_when_active, engine_args  # noqa: E402
from prefixkv_vllm.vllm_adapter.hooks.input_processor import bind_input_processor  # noqa: E402
from prefixkv_vllm.vllm_adapter.hooks.model_runner import bind_model_runner  # noqa: E402
from prefixkv_vllm.vllm_adapter.kv_spec import PrefixKVAttentionSpec  # noqa: E402
from prefixkv_vllm.vllm_adapter.worker_state import WorkerState  # noqa: E402

POLICY = PrefixKVConfig(policy="uniform", budget=0.5)

# Run in a fresh interpreter: register() patches vLLM's classes for the whole process.
PROBE = r"""
import json, sys
import vllm
if sys.argv[1]:
    vllm.__version__ = sys.argv[1]
from vllm.platforms.cpu import CpuPlatform
from vllm.v1.attention.backends.registry import AttentionBackendEnum, _ATTN_OVERRIDES
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.engine.input_processor import InputProcessor
from vllm.v1.worker.gpu_model_runner import GPUModelRunner

classes = {"runner": GPUModelRunner, "scheduler": Scheduler, "input_processor": InputProcessor, "cpu_platform": CpuPlatform}
before = {(k, n): v for k, c in classes.items() for n, v in vars(c).items()}
overrides = dict(_ATTN_OVERRIDES)
from prefixkv_vllm.vllm_adapter.plugin import register
from prefixkv_vllm.vllm_adapter.compat import vllm_problem
register()
changed = sorted(f"{k}.{n}" for k, c in classes.items() for n, v in vars(c).items() if before.get((k, n)) is not v)
print(json.dumps({"changed": changed, "overrides_changed": dict(_ATTN_OVERRIDES) != overrides, "problem": vllm_problem()}))
"""


def probe_register(version: str = "") -> dict:
    result = subprocess.run([sys.executable, "-c", PROBE, version], check=False, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--kv-budget", "0"], "argument --kv-budget: must be a number in (0, 1], got 0.0"),
        (["--kv-budget", "half"], "argument --kv-budget: not a number: 'half'"),
        (["--kv-policy", "h2o"], "argument --kv-policy: invalid choice: 'h2o'"),
        (["--kv-scorer", "max"], "argument --kv-scorer: invalid choice: 'max'"),
        (["--kv-decode", "lru"], "argument --kv-decode: invalid choice: 'lru'"),
        (["--kv-admission", "none"], "argument --kv-admission: invalid choice: 'none'"),
    ],
)
def test_bad_flags_are_argument_errors(args, message, capsys):
    parser = engine_args.add_flags(argparse.ArgumentParser(prog="vllm serve"))
    with pytest.raises(SystemExit):
        parser.parse_args(args)
    assert message in capsys.readouterr().err


@pytest.mark.slow  # a fresh interpreter imports vLLM
def test_register_patches_only_constructors_and_no_backend():
    # Everything on the per-step path (_update_states, _build_attention_metadata,
    # add_request, _free_request, _validate_params, the CPU backend) stays vLLM's own.
    # Wrapped through functools.wraps, the patched methods still read as vLLM's own to the start-up check.
    probe = probe_register()
    assert probe == {
        "changed": ["input_processor.__init__", "runner.__init__", "scheduler.__init__"], "overrides_changed": False, "problem": None,
    }  # fmt: skip


@pytest.mark.slow
def test_register_on_an_unsupported_vllm_touches_no_engine_class():
    probe = probe_register("0.40.0")
    assert (probe["changed"], probe["overrides_changed"]) == ([], False)
    assert probe["problem"] == f"PrefixKV supports vLLM {compat.SUPPORTED_VLLM}; this is vLLM 0.40.0"


class Owner:
    def __init__(self, additional_config):
        self.vllm_config = SimpleNamespace(additional_config=additional_config)

    def step(self):
        return "vllm"


def test_instances_without_a_policy_keep_vllms_methods(monkeypatch):
    class Hooked(Owner):
        pass

    bound = []

    def bind(instance, config):
        bound.append(config.policy)
        instance.step = lambda: "prefixkv"

    monkeypatch.setattr(Hooked, "__init__", Hooked.__init__)
    bind_when_active(Hooked, bind)
    off = Hooked({"unrelated": 1})
    assert "step" not in vars(off) and off.step() == "vllm" and bound == []
    on = Hooked({"kv_policy": "uniform"})
    assert on.step() == "prefixkv" and bound == ["uniform"]


# --- vLLM version -------------------------------------------------------------------


@pytest.mark.parametrize("version, supported", [("0.32.0", True), ("0.32.0+cpu", True), ("0.32.1.dev4", True), ("0.31.2", False), ("0.33.0", False), ("dev", False)])
def test_vllm_version_range(monkeypatch, version, supported):
    monkeypatch.setattr(vllm, "__version__", version)
    problem = compat.vllm_version_problem()
    assert (problem is None) == supported
    if not supported:
        assert problem == f"PrefixKV supports vLLM {compat.SUPPORTED_VLLM}; this is vLLM {version}"


def test_policy_on_an_unsupported_vllm_fails_at_start_up_and_no_policy_stays_inert(monkeypatch):
    monkeypatch.setattr(vllm, "__version__", "0.40.0")
    with pytest.raises(PrefixKVConfigError, match=r"PrefixKV supports vLLM >=.*; this is vLLM 0.40.0"):
        startup.configure_engine(SimpleNamespace(additional_config={"kv_policy": "uniform"}))
    startup.configure_engine(SimpleNamespace(additional_config={}))  # nothing read, nothing raised


# --- vLLM internals ------------------------------------------------------------------


def test_every_internal_matches_this_vllm():
    assert [compat.internal_problem(internal) for internal in compat.INTERNALS] == [None] * len(compat.INTERNALS)


def test_a_changed_vllm_signature_refuses_start_up_with_one_line(monkeypatch):
    from vllm.v1.core.kv_cache_manager import KVCacheManager

    def allocate_slots(self, request, num_new_tokens, num_new_computed_tokens=0, new_computed_blocks=None, reserve=0):
        raise AssertionError("not called")

    monkeypatch.setattr(KVCacheManager, "allocate_slots", allocate_slots)
    with pytest.raises(PrefixKVConfigError) as error:
        startup.configure_engine(SimpleNamespace(additional_config={"kv_policy": "uniform"}))
    assert str(error.value) == (
        f"PrefixKV was written for vLLM internals that changed in vLLM {vllm.__version__}: KVCacheManager.allocate_slots takes "
        "(self, request, num_new_tokens, num_new_computed_tokens=0, new_computed_blocks=None, reserve=0), not "
        + next(i.parameters for i in compat.INTERNALS if i.name == "allocate_slots")
    )


def test_a_missing_field_or_method_is_named(monkeypatch):
    fields = compat.Internal("vllm.v1.core.sched.output:SchedulerOutput", "SchedulerOutput", None, "read", ("finished_req_ids", "gone_ids"))
    assert compat.internal_problem(fields) == "SchedulerOutput.SchedulerOutput has no field gone_ids"
    method = compat.Internal("vllm.v1.core.sched.scheduler:Scheduler", "vanished", "(self)", "wrapped")
    assert compat.internal_problem(method).startswith("vllm.v1.core.sched.scheduler:Scheduler vanished is gone")


def test_shape_reads_parameters_without_annotations():
    def f(a: int, b=None, *rest, c: str = "x", d=(), **more) -> None: ...

    def g(a, *, b=object()): ...

    assert compat.shape(f) == "(a, b=None, *rest, c='x', d=(), **more)"
    assert compat.shape(g) == "(a, *, b=...)"


# --- configurations the scheduler and the worker would disagree on ------------------


def engine_config(**changes):
    model = SimpleNamespace(
        model="m", is_encoder_decoder=False, use_mla=False, get_sliding_window=lambda: None,
        hf_text_config=SimpleNamespace(), uses_alibi=False,
    )
    parallel = SimpleNamespace(decode_context_parallel_size=1, prefill_context_parallel_size=1, use_ubatching=False)
    config = SimpleNamespace(
        model_config=model, parallel_config=parallel, speculative_config=None, kv_transfer_config=None,
        cache_config=SimpleNamespace(cache_dtype="auto"), use_v2_model_runner=False,
        scheduler_config=SimpleNamespace(async_scheduling=False),
    )
    for path, value in changes.items():
        owner, name = path.split("__")
        setattr(getattr(config, owner) if owner != "config" else config, name, value)
    return config


@pytest.mark.parametrize(
    "changes, reason",
    [
        ({"config__kv_transfer_config": object()}, "KV connectors (--kv-transfer-config)"),
        ({"parallel_config__decode_context_parallel_size": 2}, "context parallelism"),
        ({"parallel_config__prefill_context_parallel_size": 2}, "context parallelism"),
        ({"parallel_config__use_ubatching": True}, "dual-batch overlap / micro-batching"),
        ({"model_config__uses_alibi": True}, "ALiBi models"),
        ({"scheduler_config__async_scheduling": True}, "async scheduling (vLLM's default on GPUs: add --no-async-scheduling)"),
    ],
)
def test_configurations_that_would_disagree_are_refused(changes, reason):
    startup._check_supported(engine_config())
    with pytest.raises(PrefixKVConfigError, match=r"^PrefixKV does not support .*\(m\)$") as error:
        startup._check_supported(engine_config(**changes))
    assert reason in str(error.value) and "\n" not in str(error.value)


def test_streaming_input_sessions_are_refused_per_request():
    calls = []
    processor = SimpleNamespace(
        _validate_params=lambda params, *args: None,
        process_inputs=lambda *args, **kwargs: calls.append(kwargs) or "request",
    )
    bind_input_processor(processor, POLICY)
    assert processor.process_inputs("id", "prompt", priority=0) == "request"
    with pytest.raises(VLLMValidationError, match="PrefixKV does not support streaming-input sessions"):
        processor.process_inputs("id", "prompt", resumable=True)
    assert calls == [{"priority": 0}]


# --- attention backend --------------------------------------------------------------


def test_a_policy_selects_the_prefixkv_backend_for_full_attention():
    config = SimpleNamespace(attention_config=AttentionConfig())
    startup.select_attention_backend(config)
    assert config.attention_config.backend_per_kind == {"full_attention": AttentionBackendEnum.CUSTOM}
    assert config.attention_config.backend is None  # other layer kinds keep vLLM's choice


def test_another_requested_backend_is_refused_with_its_name():
    config = SimpleNamespace(attention_config=AttentionConfig(backend="FLASHINFER"))
    with pytest.raises(PrefixKVConfigError, match=r"drop --attention-backend FLASHINFER$"):
        startup.select_attention_backend(config)


def test_a_platform_without_a_prefixkv_backend_is_refused(monkeypatch):
    platform = SimpleNamespace(device_name="tpu", is_cpu=lambda: False, is_cuda=lambda: False)
    monkeypatch.setattr(vllm.platforms, "current_platform", platform)
    with pytest.raises(PrefixKVConfigError, match="PrefixKV has no attention backend for the tpu platform"):
        startup.select_attention_backend(SimpleNamespace(attention_config=AttentionConfig()))


def attn_group(backend, spec, name="model.layers.0.self_attn.attn"):
    return SimpleNamespace(backend=backend, kv_cache_spec=spec, layer_names=[name], metadata_builders=[SimpleNamespace()])


def test_kv_cache_check_names_a_stock_backend_on_a_compressed_layer():
    stock = FullAttentionSpec(block_size=32, num_kv_heads=2, head_size=16, dtype=torch.float32)
    compressed = PrefixKVAttentionSpec.of(
        stock, keep_ratio=0.5, sink=1, recent=1, budget=0.5, ratio_curve=(), decode="off", interval=32, prefix_caching=False
    )
    groups = [attn_group(PrefixKVCPUBackend, compressed), attn_group(CPUAttentionBackend, stock)]
    state = WorkerState()
    backends.attach_state([groups], state)
    assert groups[0].metadata_builders[0].prefixkv_state is state  # handed to the PrefixKV builders only
    assert not hasattr(groups[1].metadata_builders[0], "prefixkv_state")
    with pytest.raises(PrefixKVConfigError) as error:
        backends.attach_state([[attn_group(PrefixKVCPUBackend, compressed)], [attn_group(CPUAttentionBackend, compressed, "layer.7")]], state)
    message = str(error.value)
    assert message.startswith("layer layer.7 runs the CPU_ATTN attention backend (vllm.v1.attention.backends.cpu_attn.CPUAttentionBackend)")
    assert "\n" not in message


# --- score lifetime -----------------------------------------------------------------


def stand_in_runner(req_ids):
    batch = SimpleNamespace(
        num_reqs=len(req_ids), req_ids=req_ids, num_prompt_tokens=np.full(len(req_ids), 64),
        num_computed_tokens_cpu=np.full(len(req_ids), 10),
    )
    requests = {r: SimpleNamespace(sampling_params=SimpleNamespace(extra_args=None)) for r in "abcd"}
    return SimpleNamespace(
        input_batch=batch, requests=requests, attn_groups=[], kv_cache_config=SimpleNamespace(kv_cache_groups=[]), device="cpu",
        parallel_config=SimpleNamespace(tensor_parallel_size=1),
        get_kv_cache_spec=dict, initialize_kv_cache=lambda *a: None,
        _update_states=lambda output: None, _build_attention_metadata=lambda *a: "metadata",
        _model_forward=lambda **inputs: "hidden states",
    )


def test_scores_live_until_the_request_finishes_or_is_preempted(monkeypatch):
    monkeypatch.setattr(backends, "use_prefixkv_backend", lambda: None)
    runner = stand_in_runner(["b", "c", "d"])
    store = bind_model_runner(runner, POLICY).store
    for req_id in "abcd":
        store.scores(req_id, "layer.0", 64, (1, 64), "cpu", fresh=True).add_(1.0)
    # "a" (a partial prefill) got no tokens this step: it is not in the batch.
    assert runner._build_attention_metadata() == "metadata"
    runner._update_states(SimpleNamespace(finished_req_ids={"b"}, preempted_req_ids={"c"}))
    assert store.take_scores("a", "layer.0", 64).sum() == 64
    assert store.take_scores("d", "layer.0", 64) is not None
    assert store.take_scores("b", "layer.0", 64) is None and store.take_scores("c", "layer.0", 64) is None
    assert len(store) == 0


def test_the_step_is_handed_to_the_builders_only_while_the_runner_builds_metadata(monkeypatch):
    monkeypatch.setattr(backends, "use_prefixkv_backend", lambda: None)
    runner = stand_in_runner(["a", "b"])
    seen = []
    runner._build_attention_metadata = lambda *a: seen.append(state.batch)
    state = bind_model_runner(runner, POLICY)
    runner._build_attention_metadata()
    assert seen[0].req_ids == ["a", "b"] and seen[0].prompt_lens.tolist() == [64, 64]
    assert state.batch is None


def test_the_steps_compactions_are_launched_once_the_model_forward_returns(monkeypatch):
    monkeypatch.setattr(backends, "use_prefixkv_backend", lambda: None)
    runner = stand_in_runner(["a"])
    order = []
    runner._model_forward = lambda **inputs: order.append("forward") or "hidden states"
    state = bind_model_runner(runner, POLICY)
    monkeypatch.setattr(state.moves, "flush", lambda: order.append("flush"))
    assert runner._model_forward(input_ids=None) == "hidden states"
    assert order == ["forward", "flush"]
