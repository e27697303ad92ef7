#!/usr/bin/env bash
# Sets up the environment if needed, serves the bundled demo model (SmolLM2-135M-Instruct)
# with `vllm serve --kv-policy prefixkv --kv-budget 0.2` on this machine's CPU, asks it one
# question about a long document, prints the answer and the KV-cache usage, and stops.
# Extra arguments go to the server (for example --kv-budget 0.5 or --kv-policy uniform).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="$(bash "$root/scripts/setup_env.sh")"
bin="$(dirname "$python")"
model="$("$bin/prefixkv" demo-model)"
port="${PORT:-8011}"
log="$(mktemp -t prefixkv-demo.XXXXXX.log)"

# bf16 where the CPU has AMX (vLLM's fastest kernel there), fp32 elsewhere; DTYPE=... overrides it.
dtype="${DTYPE:-$("$python" "$root/benchmarks/machine.py")}"

export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-2}"
"$bin/vllm" serve "$model" --served-model-name demo --kv-policy prefixkv --kv-budget 0.2 \
  --dtype "$dtype" --enforce-eager --block-size 32 --max-model-len 8192 --port "$port" "$@" >"$log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null; wait "$server" 2>/dev/null || true' EXIT

echo "demo: serving $model in $dtype on port $port (log: $log)" >&2
echo "demo: the first start calibrates per-layer ratios (about 4 minutes on 2 cores, cached after)" >&2
"$python" - "$port" "$server" "$log" <<'PY'
import json, os, sys, time, urllib.request

port, server = sys.argv[1], int(sys.argv[2])
base = f"http://127.0.0.1:{port}"
deadline = time.time() + 1800
while True:
    try:
        urllib.request.urlopen(f"{base}/health", timeout=5)
        break
    except OSError:
        if time.time() > deadline:
            sys.exit("demo: the server did not become healthy in 30 minutes")
        try:
            os.kill(server, 0)
        except ProcessLookupError:
            sys.exit("demo: the server exited during start-up; see its log")
        time.sleep(2)
shelves = " ".join(f"Shelf {i} holds {i * 7 % 31} {('red', 'blue', 'green')[i % 3]} boxes." for i in range(150))
question = "What is the capital of France?"
body = {
    "model": "demo",
    "messages": [{"role": "user", "content": f"{shelves}\n\nIgnore the list above. {question}"}],
    "max_tokens": 48,
    "temperature": 0,
}
request = urllib.request.Request(
    f"{base}/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
)
reply = json.load(urllib.request.urlopen(request, timeout=600))
answer = reply["choices"][0]["message"]["content"]
print(f"Q: ({reply['usage']['prompt_tokens']}-token prompt) {question}\nA: {answer.strip()}")
with open(sys.argv[3]) as log:
    plan = [line.split("PrefixKV: ", 1)[1].strip() for line in log if "PrefixKV: policy=" in line]
if plan:
    print(f"PrefixKV: {plan[-1]}")
PY
