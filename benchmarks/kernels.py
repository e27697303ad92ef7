"""Kernel costs: importance scoring against prefill attention, compaction against memory bandwidth.

For each model shape and prompt length (one prompt, as in a prefill step):

* ``torch.ops.prefixkv.importance`` with the full prompt scored (``raw``/``mean``
  scorers), once computing the row log-sum-exp itself and once given it (as an
  attention kernel that returns lse could), and with a 32-query observation
  window (``window`` scorer); each as a fraction of causal prefill attention for
  the same shape (``torch.nn.functional.scaled_dot_product_attention``, the flash
  backend on CUDA, as a stand-in for FlashAttention), and as TFLOP/s against the
  device's dense bf16 peak (causal QK^T counts S^2 * D * Hq FLOPs per pass);
* ``torch.ops.prefixkv.compact`` keeping 20% of the prompt per KV head, in
  vLLM's FlashAttention cache layout, as GB/s (every moved K and V row read once
  and written once) against the device's memory bandwidth;
* the pure-torch references (``prefixkv_vllm.ops.reference``) for the same
  work where they fit in memory;
* the server's own calls (``backends/core.py``) for a batch of prompts: one layer's
  window scoring as ``_accumulate_scores`` makes it (whole window in one prefill
  chunk, or halved by a chunk boundary) against that layer's batched prefill
  attention, and one step's compaction as ``PendingMoves.flush`` launches it for
  every layer and request (a prompt's end, a decode round) against the same
  kernels called per layer and ``Tensor.copy_`` of the moved bytes.

Writes ``results/kernels.md``, ``.json`` and ``.png``.

    python benchmarks/kernels.py                      # CUDA, 1k-32k tokens
    python benchmarks/kernels.py --device cpu --smoke  # tiny shapes, checks the script runs
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F

import prefixkv_vllm.ops as ops
from prefixkv_vllm.ops import reference

RESULTS = Path(__file__).resolve().parent / "results"
WINDOW = 32  # the plugin's default --kv-window
KEEP_FRACTION = 0.2
BLOCK_SIZE = 16


@dataclass(frozen=True)
class ModelShape:
    name: str
    num_q_heads: int
    num_kv_heads: int
    head_dim: int


SHAPES = (
    ModelShape("Llama-2-7B / LLaVA-1.5-7B", 32, 32, 128),
    ModelShape("Mistral-7B / LLaVA-NeXT-Mistral-7B", 32, 8, 128),
)
SMOKE_SHAPES = (ModelShape("tiny GQA", 4, 2, 64),)

# Dense bf16 tensor-core TFLOP/s and memory GB/s from the vendor data sheets.
DEVICE_PEAKS = {
    "H100 SXM": (989.4, 3350.0),
    "H100 NVL": (835.0, 3900.0),
    "H100 PCIe": (756.0, 2000.0),
    "H100": (989.4, 3350.0),
    "H200": (989.4, 4800.0),
    "A100": (312.0, 2039.0),
}


def device_peaks(device: torch.device) -> tuple[str, float | None, float | None]:
    if device.type != "cuda":
        return platform.processor() or platform.machine(), None, None
    name = torch.cuda.get_device_name(device)
    for key, (tflops, gbs) in DEVICE_PEAKS.items():
        if all(part in name for part in key.split()):
            return name, tflops, gbs
    return name, None, None


def timed(fn, device: torch.device, repeats: int, reset=None) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls after one warm-up call.

    ``reset()`` runs untimed before every call (compaction is not idempotent).
    """
    samples = []
    for index in range(repeats + 1):
        if reset is not None:
            reset()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            elapsed = start.elapsed_time(end) / 1e3
        else:
            begun = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - begun
        if index:  # the first call is the warm-up
            samples.append(elapsed)
    return statistics.median(samples)


def paged_prompt(shape: ModelShape, seq_len: int, dtype, device, generator):
    """One prompt's query and its keys/values in vLLM's FlashAttention layout ``[N, H, bs, 2D]``."""
    num_blocks = math.ceil(seq_len / BLOCK_SIZE)
    query = torch.randn(seq_len, shape.num_q_heads, shape.head_dim, generator=generator, device=device, dtype=dtype)
    pages = torch.randn(
        num_blocks, shape.num_kv_heads, BLOCK_SIZE, 2 * shape.head_dim, generator=generator, device=device, dtype=dtype
    )
    key_cache, value_cache = pages.transpose(1, 2).split(shape.head_dim, dim=-1)
    block_table = torch.randperm(num_blocks, generator=generator, device=device).to(torch.int32)[None]
    return query, pages, key_cache, value_cache, block_table


def bench_one(shape: ModelShape, seq_len: int, dtype, device, repeats: int, reference_limit: int) -> dict:
    generator = torch.Generator(device=device).manual_seed(seq_len)
    query, pages, key_cache, value_cache, block_table = paged_prompt(shape, seq_len, dtype, device, generator)
    as_int32 = lambda values: torch.tensor(values, dtype=torch.int32, device=device)  # noqa: E731
    query_start_loc, seq_lens = as_int32([0, seq_len]), as_int32([seq_len])
    scale = shape.head_dim**-0.5
    scores = torch.zeros(1, shape.num_kv_heads, seq_len, device=device)
    no_window, window = as_int32([0]), as_int32([max(0, seq_len - WINDOW)])
    lse = blockwise_lse(query, key_cache, block_table, seq_len, scale, shape)  # for the "given lse" variant

    def score(min_query_pos, given_lse=None):
        return lambda: ops.importance(
            query, key_cache, block_table, query_start_loc, seq_lens, scale, scores, min_query_pos=min_query_pos, lse=given_lse
        )

    # Prefill attention for the same shape: [1, H, S, D], GQA expanded as SDPA's flash path needs.
    q = query.transpose(0, 1)[None]
    k = key_cache.reshape(-1, shape.num_kv_heads, shape.head_dim)[:seq_len].transpose(0, 1)[None]
    group = shape.num_q_heads // shape.num_kv_heads
    k = k.repeat_interleave(group, dim=1)
    v = k.clone()
    if device.type == "cuda" and dtype != torch.float32:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def attention():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:

        def attention():
            F.scaled_dot_product_attention(q, k, v, is_causal=True)

    row = {"model": shape.name, "seq_len": seq_len}
    row["attention_s"] = timed(attention, device, repeats)
    row["score_full_s"] = timed(score(no_window), device, repeats)
    row["score_full_given_lse_s"] = timed(score(no_window, lse), device, repeats)
    row["score_window_s"] = timed(score(window), device, repeats)
    pass_flops = seq_len * seq_len * shape.head_dim * shape.num_q_heads  # causal QK^T, 2 FLOPs per MAC
    row["score_full_tflops"] = 2 * pass_flops / row["score_full_s"] / 1e12
    row["score_given_lse_tflops"] = pass_flops / row["score_full_given_lse_s"] / 1e12
    row["attention_tflops"] = 2 * pass_flops / row["attention_s"] / 1e12

    # Compaction: keep 20% of each KV head's prompt tokens, spread over the prompt.
    kept = max(1, int(seq_len * KEEP_FRACTION))
    keep_indices = torch.stack(
        [torch.randperm(seq_len, generator=generator, device=device)[:kept].sort().values for _ in range(shape.num_kv_heads)]
    ).to(torch.int32)[None]
    num_kept = as_int32([kept])
    moved = int((keep_indices[0] != torch.arange(kept, device=device)).sum())
    row["compact_bytes"] = moved * 2 * 2 * shape.head_dim * key_cache.element_size()  # K and V, read and write
    pristine = pages.clone()

    def compact():
        ops.compact([key_cache], [value_cache], as_int32([0]), block_table, keep_indices, num_kept)

    restore = lambda: pages.copy_(pristine)  # noqa: E731
    row["compact_s"] = timed(compact, device, repeats, reset=restore)
    row["compact_gbs"] = row["compact_bytes"] / row["compact_s"] / 1e9

    if seq_len <= reference_limit:
        row["reference_score_full_s"] = timed(
            lambda: reference.importance(query, key_cache, block_table, query_start_loc, seq_lens, no_window, scale, scores),
            device,
            max(1, repeats // 5),
        )
        row["reference_compact_s"] = timed(
            lambda: reference.compact([key_cache], [value_cache], as_int32([0]), block_table, keep_indices, num_kept),
            device,
            max(1, repeats // 5),
            reset=restore,
        )
    return row


# --------------------------------------------------------------------------- #
# The server's own calls (prefixkv_vllm/vllm_adapter/backends/core.py)
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class ServerBatch:
    """``batch`` prompts of ``seq_len`` tokens in ``layers`` layers' caches (FlashAttention layout)."""

    shape: ModelShape
    seq_len: int
    batch: int
    layers: int


def server_caches(setup: ServerBatch, dtype, device, generator):
    """Per layer ``[N, H, bs, 2D]`` pages and their K/V views; block tables ``[batch, S / bs]`` (disjoint, shuffled)."""
    shape, blocks = setup.shape, math.ceil(setup.seq_len / BLOCK_SIZE)
    pages = [
        torch.randn(setup.batch * blocks, shape.num_kv_heads, BLOCK_SIZE, 2 * shape.head_dim, generator=generator, device=device, dtype=dtype)
        for _ in range(setup.layers)
    ]
    views = [page.transpose(1, 2).split(shape.head_dim, dim=-1) for page in pages]
    tables = torch.randperm(setup.batch * blocks, generator=generator, device=device).to(torch.int32).view(setup.batch, blocks)
    return pages, views, tables


def window_inputs(setup: ServerBatch, window_chunks: list[int], device) -> list[dict]:
    """What ``core._score_work`` builds once per step for a prompt's window, per prefill chunk.

    ``window_chunks``: the window's queries per chunk (``[32]``, or ``[16, 16]`` when a chunk
    boundary splits it); the queries of each chunk are packed, request after request.
    """
    seq_len, batch = setup.seq_len, setup.batch
    as_int32 = lambda values: torch.tensor(values, dtype=torch.int32).to(device)  # noqa: E731
    steps, done = [], 0
    for count in window_chunks:
        end = seq_len - WINDOW + done + count  # the chunk ends here: keys 0..end-1
        token_index = torch.cat([torch.arange(r * seq_len + end - count, r * seq_len + end) for r in range(batch)])
        steps.append(dict(
            token_index=token_index.to(device), query_start_loc=as_int32([count * r for r in range(batch + 1)]),
            seq_lens=as_int32([end] * batch), min_query_pos=as_int32([seq_len - WINDOW] * batch),
        ))  # fmt: skip
        done += count
    return steps


def server_scoring(setup: ServerBatch, key_cache, tables, queries, steps: list[dict]) -> None:
    """``core._accumulate_scores`` for one layer, in each step of the window: the scored queries,
    the chunk's score buffer, one ``ops.importance``, and each request's stored scores updated."""
    shape, device = setup.shape, queries.device
    stored = [torch.zeros(shape.num_kv_heads, setup.seq_len, device=device) for _ in range(setup.batch)]  # RequestStore
    for step in steps:
        chunk = torch.zeros(setup.batch, shape.num_kv_heads, setup.seq_len, dtype=torch.float32, device=device)
        ops.importance(
            queries.index_select(0, step["token_index"]), key_cache, tables, step["query_start_loc"], step["seq_lens"],
            shape.head_dim**-0.5, chunk, min_query_pos=step["min_query_pos"],
        )  # fmt: skip
        for r in range(setup.batch):
            stored[r].add_(chunk[r])


def batched_attention(setup: ServerBatch, dtype, device, generator):
    """Causal prefill attention over the batch for one layer (SDPA; GQA expanded)."""
    shape = setup.shape
    q = torch.randn(setup.batch, shape.num_q_heads, setup.seq_len, shape.head_dim, generator=generator, device=device, dtype=dtype)
    k, v = torch.randn_like(q), torch.randn_like(q)
    if device.type == "cuda" and dtype != torch.float32:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def attention():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                F.scaled_dot_product_attention(q, k, v, is_causal=True)

        return attention
    return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)


def prompt_end_selection(seq_len: int, heads: int, generator, device) -> torch.Tensor:
    """``[heads, K]`` op slots of a prompt's end (``core._select_row``): the rewritten blocks are op
    slots ``[0, K)``, the freed ones after; the kept 20% anywhere in the prompt, in op-slot order."""
    kept = max(1, int(seq_len * KEEP_FRACTION) // BLOCK_SIZE * BLOCK_SIZE)
    return torch.stack([torch.randperm(seq_len, generator=generator, device=device)[:kept].sort().values for _ in range(heads)])


def decode_round_selection(seq_len: int, heads: int, generator, device) -> torch.Tensor:
    """``[heads, K]`` op slots of a decode round: K + one freed block of candidates, one block's worth
    of tokens evicted (``scored``: anywhere after the sink); everything after them shifts down."""
    kept = max(1, int(seq_len * KEEP_FRACTION) // BLOCK_SIZE * BLOCK_SIZE)
    rows = []
    for _ in range(heads):
        evicted = torch.randperm(kept + BLOCK_SIZE - 4, generator=generator, device=device)[:BLOCK_SIZE] + 4
        keep = torch.ones(kept + BLOCK_SIZE, dtype=torch.bool, device=device)
        keep[evicted] = False
        rows.append(keep.nonzero().flatten())
    return torch.stack(rows)


def server_compaction(setup: ServerBatch, views, tables, keep: torch.Tensor):
    """``PendingMoves.flush``'s one call for every layer and request, and one call per layer instead.

    ``keep``: ``[layers * batch, Hkv, K]`` op slots, layer after layer.
    """
    device = keep.device
    layers = torch.arange(setup.layers, dtype=torch.int32, device=device).repeat_interleave(setup.batch)
    num_kept = torch.full((len(layers),), keep.shape[2], dtype=torch.int32, device=device)
    keys, values = [k for k, _ in views], [v for _, v in views]
    table, first_layer = tables.repeat(setup.layers, 1), torch.zeros_like(layers[: setup.batch])

    def batched():
        ops.compact(keys, values, layers, table, keep, num_kept)

    def per_layer():
        for layer in range(setup.layers):
            rows = slice(layer * setup.batch, (layer + 1) * setup.batch)
            ops.compact([keys[layer]], [values[layer]], first_layer, tables, keep[rows], num_kept[rows])

    return batched, per_layer


def bench_server(setup: ServerBatch, dtype, device, repeats: int) -> dict:
    generator = torch.Generator(device=device).manual_seed(setup.seq_len + setup.batch)
    pages, views, tables = server_caches(setup, dtype, device, generator)
    shape = setup.shape
    queries = torch.randn(setup.batch * setup.seq_len, shape.num_q_heads, shape.head_dim, generator=generator, device=device, dtype=dtype)
    row = {"model": shape.name, "seq_len": setup.seq_len, "batch": setup.batch, "layers": setup.layers}
    row["attention_s"] = timed(batched_attention(setup, dtype, device, generator), device, repeats)
    for name, chunks in (("window", [WINDOW]), ("window_split", [WINDOW // 2, WINDOW // 2])):
        steps = window_inputs(setup, chunks, device)
        row[f"{name}_s"] = timed(lambda: server_scoring(setup, views[0][0], tables, queries, steps), device, repeats)
    pristine = [page.clone() for page in pages]
    restore = lambda: [page.copy_(saved) for page, saved in zip(pages, pristine)]  # noqa: E731
    for kind, select in (("prompt_end", prompt_end_selection), ("decode_round", decode_round_selection)):
        keep = torch.stack([select(setup.seq_len, shape.num_kv_heads, generator, device) for _ in range(setup.layers * setup.batch)])
        keep = keep.to(torch.int32)
        batched, per_layer = server_compaction(setup, views, tables, keep)
        moved = int((keep != torch.arange(keep.shape[2], device=device)).sum())
        row[f"{kind}_bytes"] = moved * 2 * shape.head_dim * views[0][0].element_size()  # K and V rows
        row[f"{kind}_s"] = timed(batched, device, repeats, reset=restore)
        row[f"{kind}_per_layer_s"] = timed(per_layer, device, repeats, reset=restore)
        source = torch.empty(row[f"{kind}_bytes"], dtype=torch.uint8, device=device)
        target = torch.empty_like(source)
        row[f"{kind}_copy_s"] = timed(lambda: target.copy_(source), device, repeats)
    return row


def blockwise_lse(query, key_cache, block_table, seq_len, scale, shape):
    """Causal row lse in torch, 1024 queries at a time (the reference's S x S buffer would not fit at 32k)."""
    keys = key_cache[block_table[0].long()].reshape(-1, shape.num_kv_heads, shape.head_dim)[:seq_len].float()
    keys = keys.repeat_interleave(shape.num_q_heads // shape.num_kv_heads, dim=1).transpose(0, 1)  # [Hq, S, D]
    lse = torch.empty(shape.num_q_heads, seq_len, device=query.device)
    for begin in range(0, seq_len, 1024):
        end = min(seq_len, begin + 1024)
        logits = torch.einsum("qhd,hkd->hqk", query[begin:end].float(), keys[:, :end]) * scale
        future = torch.arange(end, device=query.device)[None, :] > torch.arange(begin, end, device=query.device)[:, None]
        lse[:, begin:end] = logits.masked_fill(future, float("-inf")).logsumexp(-1)
    return lse


def markdown(rows: list[dict], device_name: str, peak_tflops, peak_gbs, command: str, dtype) -> str:
    def pct(value, peak):
        return f"{value / peak:.0%}" if peak else "n/a"

    lines = [
        "# Kernel costs",
        "",
        f"Measured {date.today()} on {device_name}, torch {torch.__version__}, {dtype}.",
        f"Peaks used: {peak_tflops or 'n/a'} dense bf16 TFLOP/s, {peak_gbs or 'n/a'} GB/s. Command: `{command}`",
        "",
        "Scoring as a fraction of causal prefill attention for the same shape (SDPA flash stand-in):",
        "*full* scores every prompt query (lse pass + score pass), *given lse* skips the lse pass,",
        f"*window* scores the last {WINDOW} queries. Compaction keeps {KEEP_FRACTION:.0%} of each KV head's tokens.",
        "",
        "| model | tokens | attention ms | full ms (x attn) | given lse ms (x attn) | window ms (x attn) "
        "| full TFLOP/s (of peak) | compact ms | compact GB/s (of peak) | reference full ms | reference compact ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        attention = r["attention_s"]
        ref_score = f"{r['reference_score_full_s'] * 1e3:.1f}" if "reference_score_full_s" in r else "out of memory"
        ref_compact = f"{r['reference_compact_s'] * 1e3:.1f}" if "reference_compact_s" in r else "out of memory"
        lines.append(
            f"| {r['model']} | {r['seq_len']} | {attention * 1e3:.2f} "
            f"| {r['score_full_s'] * 1e3:.2f} ({r['score_full_s'] / attention:.2f}) "
            f"| {r['score_full_given_lse_s'] * 1e3:.2f} ({r['score_full_given_lse_s'] / attention:.2f}) "
            f"| {r['score_window_s'] * 1e3:.3f} ({r['score_window_s'] / attention:.3f}) "
            f"| {r['score_full_tflops']:.0f} ({pct(r['score_full_tflops'], peak_tflops)}) "
            f"| {r['compact_s'] * 1e3:.3f} | {r['compact_gbs']:.0f} ({pct(r['compact_gbs'], peak_gbs)}) "
            f"| {ref_score} | {ref_compact} |"
        )
    return "\n".join(lines) + "\n"


def server_markdown(rows: list[dict]) -> str:
    """The server's own calls: scoring per layer against batched prefill attention, compaction per step against a copy."""
    lines = [
        "",
        "## The server's own calls",
        "",
        "As `backends/core.py` makes them, for a batch of prompts: *window* is one layer's scoring in the step",
        f"that holds the last {WINDOW} queries (`_accumulate_scores`: scored queries, score buffer, one",
        "`ops.importance`, stored scores updated), *split* the same when a prefill chunk boundary halves the",
        "window (two steps), both against one layer's causal prefill attention over the batch (SDPA).",
        "Compaction is one step's `PendingMoves.flush` (one `ops.compact` for every layer and request) at a",
        f"prompt's end ({KEEP_FRACTION:.0%} kept, anywhere) and at a decode round (one block evicted, the rest",
        "shift), against the same kernels called once per layer and against `Tensor.copy_` of the moved",
        "bytes (K and V rows, read and written once: GB/s counts both).",
        "",
        "| model | tokens x batch | layers | attention ms | window ms (x attn) | split ms (x attn) "
        "| prompt end ms | per layer ms | GB/s (of copy) | decode round ms | per layer ms | GB/s (of copy) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        attention = r["attention_s"]
        cells = [f"{r['model']}", f"{r['seq_len']} x {r['batch']}", f"{r['layers']}", f"{attention * 1e3:.2f}"]
        cells += [f"{r[k] * 1e3:.3f} ({r[k] / attention:.3f})" for k in ("window_s", "window_split_s")]
        for kind in ("prompt_end", "decode_round"):
            gbs = 2 * r[f"{kind}_bytes"] / r[f"{kind}_s"] / 1e9
            cells += [f"{r[f'{kind}_s'] * 1e3:.3f}", f"{r[f'{kind}_per_layer_s'] * 1e3:.3f}", f"{gbs:.0f} ({r[f'{kind}_copy_s'] / r[f'{kind}_s']:.0%})"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        lengths = [r["seq_len"] for r in mine]
        for key, style in (("score_full_s", "-o"), ("score_full_given_lse_s", "--o"), ("score_window_s", ":o")):
            left.plot(lengths, [r[key] / r["attention_s"] for r in mine], style, label=f"{model}: {key[6:-2]}")
        right.plot(lengths, [r["compact_gbs"] for r in mine], "-o", label=model)
    left.axhline(0.25, color="black", linewidth=0.8)
    left.set(xscale="log", yscale="log", xlabel="prompt tokens", ylabel="scoring time / prefill attention time")
    right.set(xscale="log", xlabel="prompt tokens", ylabel="compaction GB/s")
    left.legend(fontsize=6)
    right.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--reference-limit", type=int, default=4096, help="longest prompt to run the references on")
    parser.add_argument("--server-lengths", type=int, nargs="+", default=[2048, 8192, 32768])
    parser.add_argument("--server-batch", type=int, default=4, help="prompts per step in the server's calls")
    parser.add_argument("--server-layers", type=int, default=8, help="layers compacting in one step")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and lengths (checks the script)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    shapes = SHAPES
    if args.smoke:
        shapes, args.lengths, args.repeats, args.reference_limit = SMOKE_SHAPES, [96, 200], 2, 200
        args.server_lengths, args.server_batch, args.server_layers = [96, 200], 2, 2
    device_name, peak_tflops, peak_gbs = device_peaks(device)
    rows = []
    for shape in shapes:
        for seq_len in args.lengths:
            row = bench_one(shape, seq_len, dtype, device, args.repeats, args.reference_limit)
            rows.append(row)
            print(json.dumps(row), flush=True)
    server_rows = []
    for shape in shapes:
        for seq_len in args.server_lengths:
            server_rows.append(bench_server(ServerBatch(shape, seq_len, args.server_batch, args.server_layers), dtype, device, args.repeats))
            print(json.dumps(server_rows[-1]), flush=True)
    command = "python benchmarks/kernels.py " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
    report = markdown(rows, device_name, peak_tflops, peak_gbs, command.strip(), dtype) + server_markdown(server_rows)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "kernels.md").write_text(report)
    (args.out_dir / "kernels.json").write_text(json.dumps({"device": device_name, "rows": rows, "server_rows": server_rows}, indent=1))
    plot(rows, args.out_dir / "kernels.png")
    print(report)


if __name__ == "__main__":
    main()
