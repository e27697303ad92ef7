#!/usr/bin/env bash
# Sets up the environment if needed, serves the bundled demo model (SmolLM2-135M-Instruct)
# with vLLM on this machine's CPU, asks it one question, prints the answer and stops.
# Extra arguments go to the server (for example --kv-budget 0.5).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="$(bash "$root/scripts/setup_env.sh")"
bin="$(dirname "$python")"
model="$("$bin/prefixkv" demo-model)"
port="${PORT:-8011}"
log="$(mktemp -t prefixkv-demo.XXXXXX.log)"

export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-2}"
"$python" -m vllm.entrypoints.openai.api_server --model "$model" --served-model-name demo \
  --dtype float32 --enforce-eager --max-model-len 4096 --port "$port" "$@" >"$log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null; wait "$server" 2>/dev/null || true' EXIT

echo "demo: serving $model on port $port (log: $log)" >&2
"$python" - "$port" "$server" <<'PY'
import json, os, sys, time, urllib.request

port, server = sys.argv[1], int(sys.argv[2])
base = f"http://127.0.0.1:{port}"
deadline = time.time() + 900
while True:
    try:
        urllib.request.urlopen(f"{base}/health", timeout=5)
        break
    except OSError:
        if time.time() > deadline:
            sys.exit("demo: the server did not become healthy in 15 minutes")
        try:
            os.kill(server, 0)
        except ProcessLookupError:
            sys.exit("demo: the server exited during start-up; see its log")
        time.sleep(2)
question = "What is the capital of France?"
body = {"model": "demo", "messages": [{"role": "user", "content": question}], "max_tokens": 48, "temperature": 0}
request = urllib.request.Request(
    f"{base}/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
)
answer = json.load(urllib.request.urlopen(request, timeout=300))["choices"][0]["message"]["content"]
print(f"Q: {question}\nA: {answer.strip()}")
PY
