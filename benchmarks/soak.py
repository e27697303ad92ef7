"""Soak: one compressed `vllm serve` on a small KV pool under a mixed, hostile load.

``soak_load`` sends ``--requests`` requests at once (prompts of 10 to
``--max-prompt-tokens`` tokens, streaming and not, ``n=2`` sampling, per-request
``kv_budget`` values of which some are invalid, streams closed before their first token
and while decoding) to a prefixkv server whose pool holds a little more than one
longest request, with a 512-token step budget so prompts are chunked. Checked: every
valid request completes with all its tokens, every invalid one gets HTTP 400, aborted
ones never complete, then a pressure phase that must preempt (``soak_load``) completes
too, KV usage returns to 0, and afterwards
``kv_budget: 1`` requests decode the same greedy tokens as stock vLLM (a second server,
without the plugin). ``tests/test_vllm_serve.py`` runs the same at a reduced size.
Writes ``soak.md`` and ``soak.json`` under ``--out-dir``; exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
from pathlib import Path

import requests

HERE = Path(__file__).resolve().parent
if __package__ in (None, ""):  # run as `python benchmarks/NAME.py`: the repository's packages
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.serving import vllm_server, vllm_version  # noqa: E402
from benchmarks.soak_load import SoakSpec, run_soak  # noqa: E402
from prefixkv_vllm.tools.demo_model import demo_model_path  # noqa: E402

SERVE = ["--dtype", "float32", "--enforce-eager", "--block-size", "32", "--served-model-name", "demo"]
CHECK_PROMPTS = [
    "Explain what a KV cache is in a transformer, in two sentences.",
    " ".join(f"Item {i}: the red box on shelf {i % 7} holds {i * 7 % 101} marbles." for i in range(60))
    + "\nHow many marbles does the box of item 12 hold?",
]


def greedy_tokens(base_url: str, prompt: str, **extra) -> list[str]:
    body = {"model": "demo", "messages": [{"role": "user", "content": prompt}], "max_tokens": 48, "temperature": 0, "logprobs": True, **extra}
    response = requests.post(f"{base_url}/v1/chat/completions", json=body, timeout=600)
    response.raise_for_status()
    return [t["token"] for t in response.json()["choices"][0]["logprobs"]["content"]]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-prompt-tokens", type=int, default=3000)
    parser.add_argument("--min-decode-tokens", type=int, default=128)
    parser.add_argument("--max-decode-tokens", type=int, default=448)
    parser.add_argument("--pool-blocks", type=int, default=3600, help="--num-gpu-blocks-override (one-layer blocks: 30 per 32 tokens)")
    parser.add_argument("--max-model-len", type=int, default=3700)
    # Defaults sized for the default pool: 3600 / 30 layers = 120 blocks of 32 tokens; five
    # 600-token prompts take 5 x 19 = 95, the four full ones alone end at 4 x 33 = 132.
    parser.add_argument("--pressure-requests", type=int, default=4, help="kv_budget 1 requests of the pressure phase (one more at the server's budget)")
    parser.add_argument("--pressure-prompt-tokens", type=int, default=600)
    parser.add_argument("--pressure-decode-tokens", type=int, default=448)
    parser.add_argument("--out-dir", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    model = str(demo_model_path())
    spec = SoakSpec(
        requests=args.requests,
        max_prompt_tokens=args.max_prompt_tokens,
        min_decode_tokens=args.min_decode_tokens,
        max_decode_tokens=args.max_decode_tokens,
        pressure_requests=args.pressure_requests,
        pressure_prompt_tokens=args.pressure_prompt_tokens,
        pressure_decode_tokens=args.pressure_decode_tokens,
    )
    env = {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    logs = Path(tempfile.mkdtemp(prefix="soak-"))
    with vllm_server(model, SERVE, log_path=logs / "stock.log", env={**env, "VLLM_PLUGINS": ""}) as stock:
        expected = [greedy_tokens(stock.base_url, p) for p in CHECK_PROMPTS]
    # vLLM's own admission, so that the load preempts (the default admission avoids it).
    server_args = [*SERVE, "--kv-policy", "prefixkv", "--kv-budget", "0.2", "--kv-admission", "stock"]
    server_args += ["--num-gpu-blocks-override", str(args.pool_blocks)]
    server_args += ["--max-model-len", str(args.max_model_len), "--max-num-batched-tokens", "512"]
    with vllm_server(model, server_args, log_path=logs / "prefixkv.log", env=env) as server:
        report = run_soak(server.base_url, spec)
        got = [greedy_tokens(server.base_url, p, vllm_xargs={"kv_budget": 1.0}) for p in CHECK_PROMPTS]
    report["budget_one_matches_stock"] = got == expected
    passed = (
        not report["failures"]
        and report["completed"] == report["expected_completed"]
        and report["pressure_completed"] == args.pressure_requests + 1
        and report["preemptions_pressure"] > 0
        and report["kv_usage_after"] == 0.0
        and report["budget_one_matches_stock"]
    )
    report.update(passed=passed, vllm=vllm_version(), date=datetime.date.today().isoformat(), server_args=server_args, logs=str(logs))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "soak.json").write_text(json.dumps(report, indent=2, default=str))
    rows = [f"| {key} | {value} |" for key, value in report.items() if key not in ("failures", "server_args", "logs")]
    (args.out_dir / "soak.md").write_text(
        "# Soak (benchmarks/soak.py)\n\n"
        f"`vllm serve {' '.join(server_args)}` on the demo model, {vllm_version()}, the other settings at their defaults "
        f"(`python benchmarks/soak.py {' '.join(argv if argv is not None else sys.argv[1:])}`). The mixed load's figures, "
        f"then the pressure phase's ({args.pressure_requests} requests at `kv_budget` 1 and one at the server's budget, "
        f"{args.pressure_prompt_tokens} + {args.pressure_decode_tokens} tokens each).\n\n"
        "| figure | value |\n|---|---|\n" + "\n".join(rows) + f"\n\nfailures: {report['failures'] or 'none'}\n"
    )
    print(json.dumps({k: v for k, v in report.items() if k != "failures"}, default=str))
    for failure in report["failures"]:
        print("FAILED", failure)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
