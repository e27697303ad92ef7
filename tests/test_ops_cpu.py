"""CPU kernels of ``torch.ops.prefixkv`` against the pure-torch references.

The references in ``prefixkv_vllm.ops.reference`` define the semantics; every
test here builds paged caches in the layouts vLLM uses and compares.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import prefixkv_vllm.ops  # noqa: F401  (registers torch.ops.prefixkv)
from prefixkv_vllm.ops import reference as ref

LAYOUTS = ("flash", "flash_hnd", "cpu", "vllm_cpu", "vllm_amx", "interleaved")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
# vLLM's AMX cache tiles 16 slots (keys) and 16 dims (values): its sizes are multiples of 16.
TILED = ("vllm_amx",)


# --------------------------------------------------------------------------- #
# Builders
# --------------------------------------------------------------------------- #


def make_caches(layout, num_blocks, block_size, num_kv_heads, head_dim, dtype, gen):
    """Storage and paged key/value views (``[num_blocks, block_size, Hkv, D]`` or tiled) in a vLLM layout.

    flash: ``[2, N, bs, H, D]`` split (the view is the storage layout).
    flash_hnd: vLLM 0.32's FlashAttention cache, ``[N, H, bs, 2D]`` pages with each
        token's key and value side by side.
    cpu: ``[2, N, H, bs, D]`` split and permuted.
    vllm_cpu: vLLM's CPU cache, ``[N, H, 2, bs * D]`` pages with keys stored
        transposed (``[D, bs]``, so head_dim is strided) and values token-major.
    vllm_amx: vLLM's CPU AMX cache, the same pages with keys in groups of 16 slots
        holding pairs of dims, and values in groups of 16 dims holding pairs of slots
        (tiled 6-D views).
    interleaved: K and V interleaved per head in one ``[N, H, 2, bs, D]`` tensor.
    """
    shape = {
        "flash": (2, num_blocks, block_size, num_kv_heads, head_dim),
        "flash_hnd": (num_blocks, num_kv_heads, block_size, 2 * head_dim),
        "cpu": (2, num_blocks, num_kv_heads, block_size, head_dim),
        "vllm_cpu": (num_blocks, num_kv_heads, 2, block_size * head_dim),
        "vllm_amx": (num_blocks, num_kv_heads, 2, block_size * head_dim),
        "interleaved": (num_blocks, num_kv_heads, 2, block_size, head_dim),
    }[layout]
    if dtype in FLOAT_DTYPES + FP8_DTYPES:
        storage = torch.randn(shape, generator=gen).to(dtype)
    else:
        storage = torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8).view(dtype)
    key, value = cache_views(layout, storage, block_size, head_dim)
    assert ref.paged_shape(key) == ref.paged_shape(value) == (num_blocks, block_size, num_kv_heads, head_dim)
    return storage, key, value


def cache_views(layout, storage, block_size, head_dim):
    if layout == "flash":
        return storage[0], storage[1]
    if layout == "flash_hnd":
        keys, values = storage.transpose(1, 2).split(head_dim, dim=-1)
        return keys, values
    if layout == "cpu":
        return storage[0].permute(0, 2, 1, 3), storage[1].permute(0, 2, 1, 3)
    if layout == "vllm_cpu":
        keys = storage[:, :, 0].unflatten(2, (head_dim, block_size)).permute(0, 3, 1, 2)
        values = storage[:, :, 1].unflatten(2, (block_size, head_dim)).permute(0, 2, 1, 3)
        return keys, values
    if layout == "vllm_amx":
        # key (s, d) at (s // 16) * 16D + (d // 2) * 32 + (s % 16) * 2 + d % 2
        keys = storage[:, :, 0].unflatten(2, (block_size // 16, head_dim // 2, 16, 2)).permute(0, 2, 4, 1, 3, 5)
        # value (s, d) at (d // 16) * 16bs + (s // 2) * 32 + (d % 16) * 2 + s % 2
        values = storage[:, :, 1].unflatten(2, (head_dim // 16, block_size // 2, 16, 2)).permute(0, 3, 5, 1, 2, 4)
        return keys, values
    return storage[:, :, 0].permute(0, 2, 1, 3), storage[:, :, 1].permute(0, 2, 1, 3)


def bits(tensor):
    """Raw bytes, for exact comparisons that also hold for NaN and fp8 payloads."""
    # Not .contiguous(): it keeps a size-1 last dim's stride, which view() refuses.
    dense = torch.empty_like(tensor, memory_format=torch.contiguous_format).copy_(tensor)
    return dense.view(torch.uint8)


def make_block_table(lengths, block_size, gen, spare_blocks=3, extra_columns=1):
    """Random non-contiguous block tables; returns (table, num_blocks)."""
    needed = [math.ceil(n / block_size) for n in lengths]
    num_blocks = sum(needed) + spare_blocks
    perm = torch.randperm(num_blocks, generator=gen).to(torch.int32)
    width = max(needed + [0]) + extra_columns
    table = torch.zeros(len(lengths), width, dtype=torch.int32)
    start = 0
    for b, n in enumerate(needed):
        table[b, :n] = perm[start : start + n]
        start += n
    return table, num_blocks


def make_query(num_tokens, num_q_heads, num_kv_heads, head_dim, dtype, gen, temperature=1.0):
    """``[T, Hq, D]`` query as a (non-contiguous) slice of a packed qkv tensor."""
    qkv = torch.randn(num_tokens, num_q_heads + 2 * num_kv_heads, head_dim, generator=gen)
    return (qkv * temperature).to(dtype)[:, :num_q_heads]


def packed_offsets(lengths):
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    return torch.tensor(offsets, dtype=torch.int32)


def run_importance(impl, query, key, table, qsl, seq_lens, min_pos, scale, scores, lse=None):
    out = scores.clone()
    impl(query, key, table, qsl, seq_lens, min_pos, scale, out, lse)
    return out


def kernel_importance(*args, **kwargs):
    return run_importance(torch.ops.prefixkv.importance, *args, **kwargs)


def reference_importance(*args, **kwargs):
    return run_importance(ref.importance, *args, **kwargs)


def assert_scores_close(actual, expected, seq_lens, initial):
    torch.testing.assert_close(actual, expected, rtol=2e-4, atol=2e-5)
    for b, n in enumerate(seq_lens.tolist()):
        assert torch.equal(actual[b, :, n:], initial[b, :, n:]), "entries past seq_len changed"


@st.composite
def importance_case(draw, max_batch=3, max_len=150):
    layout = draw(st.sampled_from(LAYOUTS))
    num_kv_heads = draw(st.sampled_from([1, 2, 3]))
    group = draw(st.sampled_from([1, 2, 3, 4]))
    head_dim = draw(st.sampled_from([32, 64] if layout in TILED else [8, 12, 32, 64]))
    block_size = draw(st.sampled_from([16, 32] if layout in TILED else [1, 5, 16, 32]))
    batch = draw(st.integers(1, max_batch))
    seq_lens, q_lens, min_pos = [], [], []
    for _ in range(batch):
        seq_len = draw(st.integers(0, max_len))
        q_len = draw(st.sampled_from([seq_len, draw(st.integers(0, seq_len))]))
        seq_lens.append(seq_len)
        q_lens.append(q_len)
        window = draw(st.one_of(st.none(), st.integers(0, seq_len + 2)))
        min_pos.append(0 if window is None else seq_len - window)
    return dict(
        layout=layout,
        dtype=draw(st.sampled_from(FLOAT_DTYPES)),
        kv_dtype=draw(st.sampled_from([None, None, *FP8_DTYPES])),  # None: the query's
        num_kv_heads=num_kv_heads,
        num_q_heads=num_kv_heads * group,
        head_dim=head_dim,
        block_size=block_size,
        seq_lens=seq_lens,
        q_lens=q_lens,
        min_pos=min_pos,
        temperature=draw(st.sampled_from([1.0, 3.0])),
        pass_lse=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def build_importance_inputs(case):
    gen = torch.Generator().manual_seed(case["seed"])
    table, num_blocks = make_block_table(case["seq_lens"], case["block_size"], gen)
    kv_dtype = case.get("kv_dtype") or case["dtype"]
    _, key, _ = make_caches(case["layout"], num_blocks, case["block_size"], case["num_kv_heads"], case["head_dim"], kv_dtype, gen)
    query = make_query(
        sum(case["q_lens"]),
        case["num_q_heads"],
        case["num_kv_heads"],
        case["head_dim"],
        case["dtype"],
        gen,
        case["temperature"],
    )
    seq_lens = torch.tensor(case["seq_lens"], dtype=torch.int32)
    max_keys = max(case["seq_lens"]) + 3
    scores = torch.rand(len(case["seq_lens"]), case["num_kv_heads"], max_keys, generator=gen)
    return dict(
        query=query,
        key=key,
        table=table,
        qsl=packed_offsets(case["q_lens"]),
        seq_lens=seq_lens,
        min_pos=torch.tensor(case["min_pos"], dtype=torch.int32),
        scale=case["head_dim"] ** -0.5,
        scores=scores,
    )


# --------------------------------------------------------------------------- #
# importance
# --------------------------------------------------------------------------- #


@settings(max_examples=60, deadline=None)
@given(importance_case())
def test_importance_matches_reference(case):
    x = build_importance_inputs(case)
    args = (x["query"], x["key"], x["table"], x["qsl"], x["seq_lens"], x["min_pos"], x["scale"], x["scores"])
    lse = None
    if case["pass_lse"]:
        lse = ref.attention_lse(x["query"], x["key"], x["table"], x["qsl"], x["seq_lens"], x["scale"])
    expected = reference_importance(*args)
    actual = kernel_importance(*args, lse=lse)
    assert_scores_close(actual, expected, x["seq_lens"], x["scores"])


@settings(max_examples=40, deadline=None)
@given(importance_case(max_batch=2, max_len=140), st.data())
def test_importance_chunked_prefill_sums_to_one_shot(case, data):
    """Running chunk by chunk (cache filled through each chunk) equals one shot."""
    case["q_lens"] = list(case["seq_lens"])  # whole prompts
    x = build_importance_inputs(case)
    one_shot = kernel_importance(
        x["query"], x["key"], x["table"], x["qsl"], x["seq_lens"], x["min_pos"], x["scale"], x["scores"]
    )
    # Split every prompt into up to 3 chunks; step c runs chunk c of every prompt.
    bounds = []
    for n in case["seq_lens"]:
        cuts = sorted(data.draw(st.lists(st.integers(0, n), min_size=2, max_size=2)))
        bounds.append([0, cuts[0], cuts[1], n])
    prompt_starts = x["qsl"].tolist()
    chunked = x["scores"].clone()
    for step in range(3):
        pieces = [
            x["query"][prompt_starts[b] + bounds[b][step] : prompt_starts[b] + bounds[b][step + 1]]
            for b in range(len(bounds))
        ]
        q_lens = [p.shape[0] for p in pieces]
        seq_lens = torch.tensor([bounds[b][step + 1] for b in range(len(bounds))], dtype=torch.int32)
        torch.ops.prefixkv.importance(
            torch.cat(pieces),
            x["key"],
            x["table"],
            packed_offsets(q_lens),
            seq_lens,
            x["min_pos"],
            x["scale"],
            chunked,
            None,
        )
    torch.testing.assert_close(chunked, one_shot, rtol=2e-4, atol=2e-5)
    assert_scores_close(
        chunked,
        reference_importance(
            x["query"], x["key"], x["table"], x["qsl"], x["seq_lens"], x["min_pos"], x["scale"], x["scores"]
        ),
        x["seq_lens"],
        x["scores"],
    )


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_importance_probabilities_sum_to_contributing_queries(layout, dtype):
    """Each scored query spreads probability 1 per head; so do the head means."""
    gen = torch.Generator().manual_seed(1)
    seq_lens, q_lens, min_pos = [200, 77, 0, 130], [200, 20, 0, 64], [0, 60, 0, 120]
    num_kv_heads, num_q_heads, head_dim, block_size = 3, 9, 64, 16
    table, num_blocks = make_block_table(seq_lens, block_size, gen)
    _, key, _ = make_caches(layout, num_blocks, block_size, num_kv_heads, head_dim, dtype, gen)
    query = make_query(sum(q_lens), num_q_heads, num_kv_heads, head_dim, dtype, gen, 2.0)
    scores = torch.zeros(len(seq_lens), num_kv_heads, 256)
    seq_t = torch.tensor(seq_lens, dtype=torch.int32)
    torch.ops.prefixkv.importance(
        query,
        key,
        table,
        packed_offsets(q_lens),
        seq_t,
        torch.tensor(min_pos, dtype=torch.int32),
        head_dim**-0.5,
        scores,
        None,
    )
    for b, (s, q, m) in enumerate(zip(seq_lens, q_lens, min_pos)):
        contributing = sum(1 for i in range(q) if s - q + i >= m)
        totals = scores[b].sum(dim=-1, dtype=torch.float64)
        torch.testing.assert_close(totals, torch.full_like(totals, float(contributing)), rtol=1e-5, atol=1e-5)
        assert torch.all(scores[b, :, s:] == 0)
        assert torch.all(scores[b] >= 0)


@pytest.mark.parametrize("layout", ["vllm_cpu", "vllm_amx", "flash"])
@pytest.mark.parametrize("kv_dtype", FP8_DTYPES)
def test_importance_reads_fp8_keys_at_their_scale(layout, kv_dtype):
    """An fp8 cache holds key / k_scale: scoring it with its k_scale equals scoring the dequantized keys."""
    gen = torch.Generator().manual_seed(3)
    seq_lens, num_kv_heads, num_q_heads, head_dim, block_size, k_scale = [90, 40], 2, 4, 64, 16, 0.37
    table, num_blocks = make_block_table(seq_lens, block_size, gen)
    _, key, _ = make_caches(layout, num_blocks, block_size, num_kv_heads, head_dim, kv_dtype, gen)
    query = make_query(sum(seq_lens), num_q_heads, num_kv_heads, head_dim, torch.bfloat16, gen, 2.0)
    args = (table, packed_offsets(seq_lens), torch.tensor(seq_lens, dtype=torch.int32))
    scores = torch.zeros(2, num_kv_heads, 96)
    prefixkv_vllm.ops.importance(query, key, *args, head_dim**-0.5, scores, k_scale=k_scale)
    dequantized = key.float() * k_scale
    expected = torch.zeros_like(scores)
    ref.importance(query, dequantized, *args, torch.zeros(2, dtype=torch.int32), head_dim**-0.5, expected)
    torch.testing.assert_close(scores, expected, rtol=2e-4, atol=2e-5)


def test_importance_long_sequence_gqa_against_reference():
    """One sequence spanning many key tiles (S = 600, Hq = 9, Hkv = 3)."""
    case = dict(
        layout="cpu",
        dtype=torch.float32,
        num_kv_heads=3,
        num_q_heads=9,
        head_dim=64,
        block_size=16,
        seq_lens=[600],
        q_lens=[600],
        min_pos=[0],
        temperature=2.0,
        seed=7,
    )
    x = build_importance_inputs(case)
    args = (x["query"], x["key"], x["table"], x["qsl"], x["seq_lens"], x["min_pos"], x["scale"], x["scores"])
    assert_scores_close(kernel_importance(*args), reference_importance(*args), x["seq_lens"], x["scores"])
    # Window: only the last 50 queries score.
    window = (*args[:5], torch.tensor([550], dtype=torch.int32), *args[6:])
    assert_scores_close(kernel_importance(*window), reference_importance(*window), x["seq_lens"], x["scores"])


def test_importance_is_deterministic_across_thread_counts():
    case = dict(
        layout="flash",
        dtype=torch.bfloat16,
        num_kv_heads=2,
        num_q_heads=8,
        head_dim=32,
        block_size=16,
        seq_lens=[300, 90],
        q_lens=[300, 40],
        min_pos=[0, 0],
        temperature=1.0,
        seed=3,
    )
    x = build_importance_inputs(case)
    args = (x["query"], x["key"], x["table"], x["qsl"], x["seq_lens"], x["min_pos"], x["scale"], x["scores"])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = kernel_importance(*args)
        torch.set_num_threads(max(2, threads))
        multi = kernel_importance(*args)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single, multi)


def test_importance_strided_scores_and_lse():
    """Non-contiguous scores are updated through their strides; lse may be strided."""
    case = dict(
        layout="interleaved",
        dtype=torch.float16,
        num_kv_heads=2,
        num_q_heads=4,
        head_dim=16,
        block_size=32,
        seq_lens=[70, 33],
        q_lens=[30, 33],
        min_pos=[0, 10],
        temperature=1.0,
        seed=11,
    )
    x = build_importance_inputs(case)
    backing = torch.rand(2, 2, 2 * x["scores"].shape[-1])
    scores = backing[:, :, ::2]
    before = backing.clone()
    lse = ref.attention_lse(x["query"], x["key"], x["table"], x["qsl"], x["seq_lens"], x["scale"])
    lse_strided = lse.t().contiguous().t()
    args = (x["query"], x["key"], x["table"], x["qsl"], x["seq_lens"], x["min_pos"], x["scale"])
    expected = scores.clone()
    ref.importance(*args, expected, lse)
    torch.ops.prefixkv.importance(*args, scores, lse_strided)
    assert_scores_close(scores, expected, x["seq_lens"], before[:, :, ::2])
    assert torch.equal(backing[:, :, 1::2], before[:, :, 1::2]), "wrote outside the scores view"


def test_importance_reads_nothing_past_seq_len():
    """Unused slots, foreign blocks and unused block-table columns are never read."""
    gen = torch.Generator().manual_seed(8)
    seq_lens, block_size = [37, 70], 16
    table, num_blocks = make_block_table(seq_lens, block_size, gen, spare_blocks=2, extra_columns=2)
    storage, key, _ = make_caches("cpu", num_blocks, block_size, 2, 32, torch.float32, gen)
    poisoned = torch.full_like(storage, float("nan"))
    poisoned_key = poisoned[0].permute(0, 2, 1, 3)
    for b, n in enumerate(seq_lens):
        for t in range(n):
            block, slot = int(table[b, t // block_size]), t % block_size
            poisoned_key[block, slot] = key[block, slot]
        table[b, math.ceil(n / block_size) :] = -1
    query = make_query(sum(seq_lens), 4, 2, 32, torch.float32, gen)
    args = (
        query,
        poisoned_key,
        table,
        packed_offsets(seq_lens),
        torch.tensor(seq_lens, dtype=torch.int32),
        torch.zeros(2, dtype=torch.int32),
        32**-0.5,
        torch.zeros(2, 2, 80),
    )
    actual = kernel_importance(*args)
    assert torch.isfinite(actual).all()
    clean = (*args[:1], key, *args[2:])
    table_clean = table.clone()
    table_clean[table_clean < 0] = 0
    expected = reference_importance(clean[0], key, table_clean, *clean[3:])
    assert_scores_close(actual, expected, args[4], args[7])


def test_importance_empty_sequences_are_noops():
    gen = torch.Generator().manual_seed(0)
    table, num_blocks = make_block_table([0, 5, 0], 4, gen)
    _, key, _ = make_caches("cpu", num_blocks, 4, 1, 8, torch.float32, gen)
    query = torch.randn(0, 2, 8)
    scores = torch.rand(3, 1, 6)
    before = scores.clone()
    torch.ops.prefixkv.importance(
        query,
        key,
        table,
        torch.zeros(4, dtype=torch.int32),
        torch.tensor([0, 5, 0], dtype=torch.int32),
        torch.zeros(3, dtype=torch.int32),
        0.5,
        scores,
        None,
    )
    assert torch.equal(scores, before)


def _importance_args(**overrides):
    gen = torch.Generator().manual_seed(0)
    table, num_blocks = make_block_table([20], 8, gen)
    _, key, _ = make_caches("flash", num_blocks, 8, 2, 16, torch.float32, gen)
    args = dict(
        query=torch.randn(20, 4, 16),
        key_cache=key,
        block_table=table,
        query_start_loc=torch.tensor([0, 20], dtype=torch.int32),
        seq_lens=torch.tensor([20], dtype=torch.int32),
        min_query_pos=torch.zeros(1, dtype=torch.int32),
        scale=0.25,
        scores=torch.zeros(1, 2, 20),
        lse=None,
    )
    args.update(overrides)
    return args


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(query=torch.randn(20, 4, 16, dtype=torch.float64)), "query must be float32, bfloat16 or float16"),
        (dict(query=torch.randn(20, 4, 16, dtype=torch.bfloat16)), "must match query dtype"),
        (dict(query=torch.randn(20, 3, 16)), "must be a multiple of num kv heads"),
        (dict(query=torch.randn(20, 4, 8)), "head_dim"),
        (dict(scores=torch.zeros(1, 2, 20, dtype=torch.float16)), "scores must be float32"),
        (dict(scores=torch.zeros(1, 2, 19)), "exceeds scores.shape"),
        (dict(scores=torch.zeros(1, 3, 20)), "scores must be"),
        (dict(seq_lens=torch.tensor([20], dtype=torch.int64)), "seq_lens must be int32"),
        (dict(seq_lens=torch.tensor([19], dtype=torch.int32)), "smaller than its query count"),
        (dict(query_start_loc=torch.tensor([0, 21], dtype=torch.int32)), "query_start_loc"),
        (dict(block_table=torch.tensor([[0, 99, 1]], dtype=torch.int32)), "out of range"),
        (dict(block_table=torch.tensor([[0, 1]], dtype=torch.int32)), "needs 3 blocks"),
        (dict(lse=torch.zeros(4, 19)), "lse must be"),
        (dict(min_query_pos=torch.zeros(2, dtype=torch.int32)), "min_query_pos"),
    ],
)
def test_importance_rejects_bad_arguments(overrides, message):
    args = _importance_args(**overrides)
    before = args["scores"].clone()
    with pytest.raises(RuntimeError, match=re.escape(message)):
        torch.ops.prefixkv.importance(*args.values())
    assert torch.equal(args["scores"], before)


def test_importance_rejects_non_contiguous_query_head_dim():
    args = _importance_args()
    args["query"] = torch.randn(20, 16, 4).transpose(1, 2)  # [20, 4, 16], head_dim strided
    with pytest.raises(RuntimeError, match="head_dim must be contiguous"):
        torch.ops.prefixkv.importance(*args.values())


# --------------------------------------------------------------------------- #
# compact
# --------------------------------------------------------------------------- #


@st.composite
def compact_case(draw):
    """A step's compaction: requests with their blocks, and items (request, layer) over 1-3 layers."""
    layout = draw(st.sampled_from(LAYOUTS))
    num_kv_heads = draw(st.sampled_from([1, 2, 4]))
    block_size = draw(st.sampled_from([16, 32] if layout in TILED else [1, 3, 16, 32]))
    num_layers = draw(st.integers(1, 3))
    num_requests = draw(st.integers(1, 3))
    lengths = [draw(st.integers(0, 100)) for _ in range(num_requests)]
    # Each layer compacts some of the requests (each its own selection), items in any order.
    items = [(r, layer) for layer in range(num_layers) for r in range(num_requests) if draw(st.booleans())]
    items = draw(st.permutations(items)) if items else [(0, 0)]
    kept = [draw(st.sampled_from([0, lengths[r], draw(st.integers(0, lengths[r]))])) for r, _ in items]
    return dict(
        layout=layout,
        dtype=draw(st.sampled_from([*FLOAT_DTYPES, *FP8_DTYPES, torch.uint8])),
        num_kv_heads=num_kv_heads,
        block_size=block_size,
        head_dim=draw(st.sampled_from([16, 64] if layout in TILED else [1, 8, 24, 64])),
        num_layers=num_layers,
        lengths=lengths,
        items=list(items),
        kept=kept,
        shared=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def compact_one_layer(key, value, table, keep, num_kept):
    """The op on a single layer: every item in layer 0."""
    layers = torch.zeros(num_kept.numel(), dtype=torch.int32)
    torch.ops.prefixkv.compact([key], [value], layers, table, keep, num_kept)


def build_keep_indices(lengths, kept, index_sets, gen, pad=2):
    width = max(kept + [0]) + pad
    keep = torch.full((len(lengths), index_sets, width), -7, dtype=torch.int32)  # junk past num_kept
    for r, (n, k) in enumerate(zip(lengths, kept)):
        for s in range(index_sets):
            keep[r, s, :k] = torch.sort(torch.randperm(n, generator=gen)[:k]).values.to(torch.int32)
    return keep


def assert_compacted(key_after, value_after, key_before, value_before, table, keep, kept):
    """Every item's kept tokens, in order, at the front of its blocks (one layer's items)."""
    _, block_size, num_kv_heads, _ = ref.paged_shape(key_before)
    for r, count in enumerate(kept):
        for g in range(num_kv_heads):
            src = keep[r, 0 if keep.shape[1] == 1 else g, :count].long()
            for after, before in ((key_after, key_before), (value_after, value_before)):
                moved = ref.paged_tokens(after, table[r], count)[:, g]
                original = ref.paged_tokens(before, table[r], table.shape[1] * block_size)[src, g]
                assert torch.equal(bits(moved), bits(original))


def layer_caches(case, num_blocks, gen):
    """One storage and its paged views per layer: same shape, dtype and strides, different contents."""
    layers = [
        make_caches(case["layout"], num_blocks, case["block_size"], case["num_kv_heads"], case["head_dim"], case["dtype"], gen)
        for _ in range(case["num_layers"])
    ]
    return [storage for storage, _, _ in layers], [key for _, key, _ in layers], [value for _, _, value in layers]


@settings(max_examples=80, deadline=None)
@given(compact_case())
def test_compact_matches_reference(case):
    gen = torch.Generator().manual_seed(case["seed"])
    requests, item_layers = zip(*case["items"])
    request_table, num_blocks = make_block_table(case["lengths"], case["block_size"], gen)
    storages, keys, values = layer_caches(case, num_blocks, gen)
    index_sets = 1 if case["shared"] else case["num_kv_heads"]
    table = request_table[list(requests)]
    keep = build_keep_indices([case["lengths"][r] for r in requests], case["kept"], index_sets, gen)
    num_kept = torch.tensor(case["kept"], dtype=torch.int32)
    layers = torch.tensor(item_layers, dtype=torch.int32)
    before = [(key.clone(), value.clone()) for key, value in zip(keys, values)]

    ref_storages = [storage.clone() for storage in storages]
    ref_views = [cache_views(case["layout"], storage, case["block_size"], case["head_dim"]) for storage in ref_storages]
    ref.compact([k for k, _ in ref_views], [v for _, v in ref_views], layers, table, keep, num_kept)

    torch.ops.prefixkv.compact(keys, values, layers, table, keep, num_kept)
    for layer in range(case["num_layers"]):
        mine = [i for i, item_layer in enumerate(item_layers) if item_layer == layer]
        kept = [case["kept"][i] for i in mine]
        assert_compacted(keys[layer], values[layer], *before[layer], table[mine], keep[mine], kept)
        # The reference leaves every other slot as it was, and so does the kernel.
        assert torch.equal(bits(storages[layer]), bits(ref_storages[layer]))


def test_compact_layers_sharing_one_tensor():
    """vLLM's hybrid models give layers of different groups one raw tensor; their items own disjoint blocks."""
    gen = torch.Generator().manual_seed(9)
    table, num_blocks = make_block_table([40, 40], 8, gen)
    storage, key, value = make_caches("flash_hnd", num_blocks, 8, 2, 16, torch.bfloat16, gen)
    key_before, value_before = key.clone(), value.clone()
    keep = build_keep_indices([40, 40], [12, 30], 2, gen)
    num_kept = torch.tensor([12, 30], dtype=torch.int32)
    layers = torch.tensor([0, 1], dtype=torch.int32)
    pristine = storage.clone()
    ref.compact([key, key], [value, value], layers, table, keep, num_kept)
    ref_result = storage.clone()
    storage.copy_(pristine)
    torch.ops.prefixkv.compact([key, key], [value, value], layers, table, keep, num_kept)
    assert_compacted(key, value, key_before, value_before, table, keep, [12, 30])
    assert torch.equal(storage, ref_result)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shared", [True, False])
def test_compact_overlapping_shift_by_one(layout, shared):
    """keep = [1, 2, ..., n-1]: every destination is the previous source."""
    gen = torch.Generator().manual_seed(5)
    n, block_size, num_kv_heads = 50, 16, 2
    table, num_blocks = make_block_table([n], block_size, gen)
    _, key, value = make_caches(layout, num_blocks, block_size, num_kv_heads, 16, torch.float32, gen)
    keep = torch.arange(1, n, dtype=torch.int32).view(1, 1, -1).repeat(1, 1 if shared else num_kv_heads, 1)
    num_kept = torch.tensor([n - 1], dtype=torch.int32)
    key_before, value_before = key.clone(), value.clone()
    compact_one_layer(key, value, table, keep, num_kept)
    tokens_after = ref.paged_tokens(key, table[0], n - 1)
    tokens_before = ref.paged_tokens(key_before, table[0], n)
    assert torch.equal(tokens_after, tokens_before[1:])
    assert torch.equal(ref.paged_tokens(value, table[0], n - 1), ref.paged_tokens(value_before, table[0], n)[1:])


def test_compact_identity_and_zero_kept_leave_cache_unchanged():
    gen = torch.Generator().manual_seed(2)
    lengths = [40, 33]
    table, num_blocks = make_block_table(lengths, 8, gen)
    storage, key, value = make_caches("cpu", num_blocks, 8, 2, 16, torch.bfloat16, gen)
    before = storage.clone()
    keep = torch.zeros(2, 1, 40, dtype=torch.int32)
    keep[0, 0, :40] = torch.arange(40)
    num_kept = torch.tensor([40, 0], dtype=torch.int32)
    compact_one_layer(key, value, table, keep, num_kept)
    assert torch.equal(storage, before)


def test_compact_per_head_selection_differs_per_head():
    gen = torch.Generator().manual_seed(4)
    table, num_blocks = make_block_table([10], 4, gen)
    _, key, value = make_caches("flash", num_blocks, 4, 2, 4, torch.float16, gen)
    key_before, value_before = key.clone(), value.clone()
    keep = torch.tensor([[[0, 5, 9], [2, 3, 7]]], dtype=torch.int32)
    compact_one_layer(key, value, table, keep, torch.tensor([3], dtype=torch.int32))
    for g, idx in enumerate(([0, 5, 9], [2, 3, 7])):
        after = ref.paged_tokens(key, table[0], 3)[:, g]
        before = ref.paged_tokens(key_before, table[0], 10)[idx, g]
        assert torch.equal(after, before)
        value_after = ref.paged_tokens(value, table[0], 3)[:, g]
        assert torch.equal(value_after, ref.paged_tokens(value_before, table[0], 10)[idx, g])


@pytest.mark.skipif(not hasattr(torch, "float8_e4m3fn"), reason="no float8 dtype")
def test_compact_fp8_cache_moves_bytes():
    gen = torch.Generator().manual_seed(6)
    table, num_blocks = make_block_table([30], 16, gen)
    _, key, value = make_caches("cpu", num_blocks, 16, 2, 32, torch.float8_e4m3fn, gen)
    key_before = bits(key).clone()
    keep = torch.tensor([[[3, 4, 17, 18, 29]]], dtype=torch.int32)
    compact_one_layer(key, value, table, keep, torch.tensor([5], dtype=torch.int32))
    after = ref.paged_tokens(bits(key), table[0], 5)
    assert torch.equal(after, ref.paged_tokens(key_before, table[0], 30)[[3, 4, 17, 18, 29]])


def _compact_args(keep, num_kept, table=None, dtype=torch.int32):
    gen = torch.Generator().manual_seed(0)
    if table is None:
        table, _ = make_block_table([12], 4, gen, spare_blocks=1)  # 3 blocks + 1 column
    storage, key, value = make_caches("cpu", 5, 4, 2, 8, torch.float32, gen)
    return storage, key, value, table, torch.tensor(keep, dtype=dtype), torch.tensor(num_kept, dtype=torch.int32)


@pytest.mark.parametrize(
    ("keep", "num_kept", "message"),
    [
        ([[[0, 2, 2, 5]]], [4], "must be strictly increasing"),
        ([[[3, 1, 4, 5]]], [3], "must be strictly increasing"),
        ([[[0, 1, 16]]], [3], "out of range"),  # capacity = 4 columns * 4 slots
        ([[[-1, 1, 2]]], [3], "out of range"),
        ([[[0, 1, 2]]], [4], "num_kept[0] = 4"),
        ([[[0, 1, 2]]], [-1], "num_kept[0] = -1"),
        ([[[0, 1, 2]], [[0, 1, 2]]], [3], "keep_indices must be [I, Hs, K]"),
        ([[[0, 1], [0, 1], [0, 1]]], [2], "keep_indices.shape[1] must be 1"),
    ],
)
def test_compact_rejects_bad_indices_without_writing(keep, num_kept, message):
    storage, key, value, table, keep_t, kept_t = _compact_args(keep, num_kept)
    before = storage.clone()
    with pytest.raises(RuntimeError, match=re.escape(message)):
        compact_one_layer(key, value, table, keep_t, kept_t)
    assert torch.equal(storage, before)


def test_compact_later_request_error_leaves_earlier_requests_untouched():
    gen = torch.Generator().manual_seed(0)
    table, num_blocks = make_block_table([8, 8], 4, gen)
    storage, key, value = make_caches("flash", num_blocks, 4, 1, 8, torch.float32, gen)
    before = storage.clone()
    keep = torch.tensor([[[2, 3, 5]], [[4, 4, 6]]], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="strictly increasing"):
        compact_one_layer(key, value, table, keep, torch.tensor([3, 3], dtype=torch.int32))
    assert torch.equal(storage, before)


@pytest.mark.parametrize(
    ("what", "message"),
    [
        ("keep_int64", "keep_indices must be int32"),
        ("table_int64", "block_table must be int32"),
        ("value_dtype", "value_caches dtype"),
        ("value_shape", "value_caches shape"),
        ("bad_block_id", "out of range"),
    ],
)
def test_compact_rejects_bad_arguments(what, message):
    storage, key, value, table, keep, num_kept = _compact_args([[[1, 2, 3]]], [3])
    if what == "keep_int64":
        keep = keep.long()
    elif what == "table_int64":
        table = table.long()
    elif what == "value_dtype":
        value = value.to(torch.float16)
    elif what == "value_shape":
        value = value[:, :, :1]
    elif what == "bad_block_id":
        table = torch.tensor([[0, 77, 1, 2]], dtype=torch.int32)
        keep = torch.tensor([[[1, 5, 6]]], dtype=torch.int32)
    before = storage.clone()
    with pytest.raises(RuntimeError, match=re.escape(message)):
        compact_one_layer(key, value, table, keep, num_kept)
    assert torch.equal(storage, before)


def _two_layers():
    """Two layers of one layout, one item in each (request 0 in layer 0, in layer 1 too)."""
    storage, key, value, table, keep, num_kept = _compact_args([[[1, 2, 3]], [[0, 2, 5]]], [3, 3], table=torch.tensor([[0, 1, 2, 3]] * 2, dtype=torch.int32))
    other = storage.clone()
    other_key, other_value = cache_views("cpu", other, 4, 8)
    return [storage, other], [key, other_key], [value, other_value], table, keep, num_kept


@pytest.mark.parametrize(
    ("what", "message"),
    [
        ("layer_out_of_range", "layers[1] = 2 is out of range [0, 2)"),
        ("negative_layer", "layers[0] = -1 is out of range"),
        ("layers_length", "layers must have I = 2 entries"),
        ("layers_int64", "layers must be int32"),
        ("later_item_bad", "strictly increasing"),
        ("key_shape_differs", "key_caches[1] (shape"),
        ("key_strides_differ", "key_caches[1] (shape"),
        ("value_dtype_differs", "value_caches[1] (shape"),
        ("list_lengths", "2 key_caches but 1 value_caches"),
        ("no_layers", "key_caches must hold at least one layer"),
    ],
)
def test_compact_rejects_bad_layers_without_writing_any_layer(what, message):
    storages, keys, values, table, keep, num_kept = _two_layers()
    layers = torch.tensor([0, 1], dtype=torch.int32)
    if what == "layer_out_of_range":
        layers = torch.tensor([0, 2], dtype=torch.int32)
    elif what == "negative_layer":
        layers = torch.tensor([-1, 1], dtype=torch.int32)
    elif what == "layers_length":
        layers = torch.tensor([0], dtype=torch.int32)
    elif what == "layers_int64":
        layers = layers.long()
    elif what == "later_item_bad":
        keep = torch.tensor([[[1, 2, 3]], [[0, 5, 5]]], dtype=torch.int32)
    elif what == "key_shape_differs":
        keys[1] = keys[1][:4]
    elif what == "key_strides_differ":
        keys[1] = keys[1].contiguous()
    elif what == "value_dtype_differs":
        values[1] = values[1].to(torch.float16)
    elif what == "list_lengths":
        values = values[:1]
    elif what == "no_layers":
        keys, values = [], []
    before = [storage.clone() for storage in storages]
    with pytest.raises(RuntimeError, match=re.escape(message)):
        torch.ops.prefixkv.compact(keys, values, layers, table, keep, num_kept)
    for storage, original in zip(storages, before):
        assert torch.equal(storage, original)
