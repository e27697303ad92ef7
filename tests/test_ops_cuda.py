"""CUDA ops against the pure-torch reference (skipped without a CUDA device).

float16/bfloat16 with head_dim % 16 == 0 run the tensor-core kernels
(csrc/cuda/importance_mma.cu); float32 and other head dims run the SIMT ones.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings

from prefixkv_vllm.ops import reference as ref

from .test_ops_cpu import (
    bits,
    build_importance_inputs,
    build_keep_indices,
    cache_views,
    compact_case,
    importance_case,
    layer_caches,
    make_block_table,
    make_caches,
)

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
# The CUDA kernels read head_dim rows with vector loads: layouts with a contiguous head_dim.
CUDA_LAYOUTS = ("flash", "flash_hnd", "cpu", "interleaved")


def to_cuda(values):
    return [v.cuda() if isinstance(v, torch.Tensor) else v for v in values]


def importance_both_ways(case, pass_lse):
    """(CUDA result, reference result) for one case."""
    x = build_importance_inputs(case)
    args = (x["query"], x["key"], x["table"], x["qsl"], x["seq_lens"], x["min_pos"], x["scale"])
    lse = ref.attention_lse(*args[:5], x["scale"]) if pass_lse else None
    expected = x["scores"].clone()
    ref.importance(*args, expected, lse)
    actual = x["scores"].cuda()
    torch.ops.prefixkv.importance(*to_cuda(args), actual, None if lse is None else lse.cuda())
    return actual.cpu(), expected


@settings(max_examples=60, deadline=None)
@given(importance_case())
def test_importance_cuda_matches_reference(case):
    if case["layout"] not in CUDA_LAYOUTS:
        case["layout"] = "flash_hnd"
    actual, expected = importance_both_ways(case, case["pass_lse"])
    torch.testing.assert_close(actual, expected, rtol=2e-3, atol=2e-4)


@pytest.mark.parametrize("kv_dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_importance_cuda_reads_fp8_keys(kv_dtype, dtype):
    """FlashAttention's fp8 KV cache: keys stored in fp8, queries in the model's dtype."""
    case = dict(
        layout="flash_hnd", dtype=dtype, kv_dtype=kv_dtype, num_kv_heads=2, num_q_heads=8, head_dim=128, block_size=16,
        seq_lens=[300, 65], q_lens=[300, 33], min_pos=[0, 40], temperature=2.0, pass_lse=False, seed=11,
    )
    actual, expected = importance_both_ways(case, pass_lse=False)
    torch.testing.assert_close(actual, expected, rtol=2e-3, atol=2e-4)


def test_tiled_views_are_cpu_only():
    gen = torch.Generator().manual_seed(0)
    _, key, value = make_caches("vllm_amx", 4, 16, 2, 32, torch.bfloat16, gen)
    table = torch.zeros(1, 4, dtype=torch.int32, device="cuda")
    keep = torch.zeros(1, 1, 1, dtype=torch.int32, device="cuda")
    with pytest.raises(RuntimeError, match="tiled views are CPU cache layouts"):
        one_layer_compact(key.cuda(), value.cuda(), table, keep, torch.ones(1, dtype=torch.int32, device="cuda"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("head_dim", [64, 80, 128, 256, 40])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("pass_lse", [False, True])
def test_importance_cuda_model_shapes(dtype, head_dim, group, pass_lse):
    """Several 64-row tiles, tile-straddling chunks and windows, Llama/LLaVA head dims."""
    case = dict(
        layout="flash_hnd",
        dtype=dtype,
        num_kv_heads=2,
        num_q_heads=2 * group,
        head_dim=head_dim,
        block_size=16,
        seq_lens=[700, 129, 64, 1, 300, 700],
        q_lens=[700, 65, 64, 1, 37, 700],  # whole prompts and later chunks
        min_pos=[0, 0, 40, 0, 290, 650],  # windows that start inside a tile, after ten of them
        temperature=2.0,
        pass_lse=pass_lse,
        seed=head_dim * 10 + group,
    )
    actual, expected = importance_both_ways(case, pass_lse)
    torch.testing.assert_close(actual, expected, rtol=2e-3, atol=2e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])  # tensor-core and SIMT lse passes
@pytest.mark.parametrize("pass_lse", [False, True])
def test_importance_cuda_window_over_long_prompts(dtype, pass_lse):
    """The server's call: the last 32 queries of long prompts, the lse pass split over keys
    (a handful of query tiles cannot fill the GPU), and a short prompt with its window inside."""
    case = dict(
        layout="flash_hnd", dtype=dtype, num_kv_heads=2, num_q_heads=8, head_dim=128, block_size=16,
        seq_lens=[8192, 3000, 40], q_lens=[32, 32, 40], min_pos=[8160, 2968, 8], temperature=2.0,
        pass_lse=pass_lse, seed=8,
    )
    actual, expected = importance_both_ways(case, pass_lse)
    torch.testing.assert_close(actual, expected, rtol=2e-3, atol=2e-4)


def test_importance_cuda_accumulates_across_chunks():
    case = dict(
        layout="flash_hnd", dtype=torch.bfloat16, num_kv_heads=2, num_q_heads=8, head_dim=128, block_size=16,
        seq_lens=[500], q_lens=[500], min_pos=[0], temperature=1.0, pass_lse=False, seed=3,
    )
    x = build_importance_inputs(case)
    one_shot = x["scores"].cuda()
    torch.ops.prefixkv.importance(
        *to_cuda((x["query"], x["key"], x["table"], x["qsl"], x["seq_lens"], x["min_pos"], x["scale"])), one_shot, None
    )
    chunked = x["scores"].cuda()
    for begin, end in [(0, 100), (100, 333), (333, 500)]:
        torch.ops.prefixkv.importance(
            x["query"][begin:end].cuda(), x["key"].cuda(), x["table"].cuda(),
            torch.tensor([0, end - begin], dtype=torch.int32, device="cuda"),
            torch.tensor([end], dtype=torch.int32, device="cuda"), x["min_pos"].cuda(), x["scale"], chunked, None,
        )
    torch.testing.assert_close(chunked, one_shot, rtol=1e-4, atol=1e-5)


def test_strided_head_dim_is_rejected_on_cuda():
    gen = torch.Generator().manual_seed(0)
    table, num_blocks = make_block_table([20], 16, gen)
    _, key, value = make_caches("vllm_cpu", num_blocks, 16, 2, 32, torch.bfloat16, gen)
    keep = build_keep_indices([20], [4], 1, gen)
    with pytest.raises(RuntimeError, match="head_dim must be contiguous on CUDA"):
        one_layer_compact(key.cuda(), value.cuda(), table.cuda(), keep.cuda(), torch.tensor([4], dtype=torch.int32, device="cuda"))


def one_layer_compact(key, value, table, keep, num_kept):
    layers = torch.zeros(num_kept.numel(), dtype=torch.int32, device=num_kept.device)
    torch.ops.prefixkv.compact([key], [value], layers, table, keep, num_kept)


def compact_both_ways(case):
    """(CUDA storages after, reference storages after), one per layer, for one compaction case."""
    gen = torch.Generator().manual_seed(case["seed"])
    requests, item_layers = zip(*case["items"])
    request_table, num_blocks = make_block_table(case["lengths"], case["block_size"], gen)
    storages, _, _ = layer_caches(case, num_blocks, gen)
    table = request_table[list(requests)]
    keep = build_keep_indices([case["lengths"][r] for r in requests], case["kept"], 1 if case["shared"] else case["num_kv_heads"], gen)
    num_kept = torch.tensor(case["kept"], dtype=torch.int32)
    layers = torch.tensor(item_layers, dtype=torch.int32)
    expected = [storage.clone() for storage in storages]
    views = [cache_views(case["layout"], storage, case["block_size"], case["head_dim"]) for storage in expected]
    ref.compact([k for k, _ in views], [v for _, v in views], layers, table, keep, num_kept)
    on_device = [storage.cuda() for storage in storages]
    views = [cache_views(case["layout"], storage, case["block_size"], case["head_dim"]) for storage in on_device]
    torch.ops.prefixkv.compact([k for k, _ in views], [v for _, v in views], *to_cuda((layers, table, keep, num_kept)))
    return [storage.cpu() for storage in on_device], expected


@settings(max_examples=60, deadline=None)
@given(compact_case())
def test_compact_cuda_matches_reference(case):
    if case["layout"] not in CUDA_LAYOUTS:
        case["layout"] = "flash_hnd"
    for actual, expected in zip(*compact_both_ways(case)):
        assert torch.equal(bits(actual), bits(expected))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.uint8, torch.float32])  # uint8: fp8 caches' bytes
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_compact_cuda_model_shapes(dtype, head_dim):
    """Long prompts (several shared-memory tiles of the in-order head per KV head, many tail chunks)
    over three layers in FlashAttention's layout; the shift by one is all head, in one in-order walk."""
    case = dict(
        layout="flash_hnd", dtype=dtype, num_kv_heads=8, block_size=16, head_dim=head_dim, num_layers=3,
        lengths=[3000, 517, 64], items=[(0, 0), (1, 0), (2, 0), (0, 2), (1, 1), (2, 2)],
        kept=[600, 517, 1, 2900, 300, 63], shared=False, seed=head_dim,
    )
    for actual, expected in zip(*compact_both_ways(case)):
        assert torch.equal(bits(actual), bits(expected))
    gen = torch.Generator().manual_seed(1)
    table, num_blocks = make_block_table([3000], 16, gen)
    storage, key, value = make_caches("flash_hnd", num_blocks, 16, 8, head_dim, dtype, gen)
    keep = torch.arange(1, 3000, dtype=torch.int32).view(1, 1, -1)
    expected = storage.clone()
    ref.compact(*[[view] for view in cache_views("flash_hnd", expected, 16, head_dim)], torch.zeros(1, dtype=torch.int32), table, keep, torch.tensor([2999], dtype=torch.int32))
    on_device = storage.cuda()
    one_layer_compact(*cache_views("flash_hnd", on_device, 16, head_dim), *to_cuda((table, keep, torch.tensor([2999], dtype=torch.int32))))
    assert torch.equal(bits(on_device.cpu()), bits(expected))


def test_ops_replay_inside_a_cuda_graph():
    """Both ops read no device values on the host, so they can be captured and replayed."""
    case = dict(
        layout="flash_hnd", dtype=torch.bfloat16, num_kv_heads=2, num_q_heads=8, head_dim=128, block_size=16,
        seq_lens=[300, 90], q_lens=[300, 26], min_pos=[0, 0], temperature=1.0, pass_lse=False, seed=5,
    )
    x = build_importance_inputs(case)
    args = to_cuda((x["query"], x["key"], x["table"], x["qsl"], x["seq_lens"], x["min_pos"], x["scale"]))
    eager = x["scores"].cuda()
    torch.ops.prefixkv.importance(*args, eager, None)

    captured = x["scores"].cuda()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, as torch recommends
        torch.ops.prefixkv.importance(*args, x["scores"].cuda(), None)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        torch.ops.prefixkv.importance(*args, captured, None)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured, eager, rtol=0, atol=0)  # deterministic kernels

    gen = torch.Generator().manual_seed(6)
    table, num_blocks = make_block_table([300, 90], 16, gen)
    storage, _, _ = make_caches("flash_hnd", num_blocks, 16, 2, 128, torch.bfloat16, gen)
    keep = build_keep_indices([300, 90], [64, 32], 2, gen)
    num_kept = torch.tensor([64, 32], dtype=torch.int32)
    layers = torch.zeros(2, dtype=torch.int32)
    expected = storage.clone()
    ref.compact(*[[view] for view in cache_views("flash_hnd", expected, 16, 128)], layers, table, keep, num_kept)
    device_storage = storage.cuda()
    key, value = cache_views("flash_hnd", device_storage, 16, 128)
    compact_args = ([key], [value], *to_cuda((layers, table, keep, num_kept)))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        torch.ops.prefixkv.compact(*compact_args)
    graph.replay()  # once: compaction is not idempotent
    torch.cuda.synchronize()
    assert torch.equal(bits(device_storage.cpu()), bits(expected))
