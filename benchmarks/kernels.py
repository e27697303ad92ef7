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
  work where they fit in memory.

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
        ops.compact(key_cache, value_cache, block_table, keep_indices, num_kept)

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
            lambda: reference.compact(key_cache, value_cache, block_table, keep_indices, num_kept),
            device,
            max(1, repeats // 5),
            reset=restore,
        )
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
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and lengths (checks the script)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    shapes = SHAPES
    if args.smoke:
        shapes, args.lengths, args.repeats, args.reference_limit = SMOKE_SHAPES, [96, 200], 2, 200
    device_name, peak_tflops, peak_gbs = device_peaks(device)
    rows = []
    for shape in shapes:
        for seq_len in args.lengths:
            row = bench_one(shape, seq_len, dtype, device, args.repeats, args.reference_limit)
            rows.append(row)
            print(json.dumps(row), flush=True)
    command = "python benchmarks/kernels.py " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
    report = markdown(rows, device_name, peak_tflops, peak_gbs, command.strip(), dtype)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "kernels.md").write_text(report)
    (args.out_dir / "kernels.json").write_text(json.dumps({"device": device_name, "rows": rows}, indent=1))
    plot(rows, args.out_dir / "kernels.png")
    print(report)


if __name__ == "__main__":
    main()
