"""Start `vllm serve` on the demo model for end-to-end tests, and talk to it."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests

VLLM = str(Path(sys.executable).parent / "vllm")
SERVE_DEFAULTS = ["--dtype", "float32", "--enforce-eager", "--block-size", "32", "--served-model-name", "demo"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    def __init__(self, base_url: str, process: subprocess.Popen, log_path: Path):
        self.base_url, self.process, self.log_path = base_url, process, log_path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def chat(self, content: str, max_tokens: int = 48, **extra) -> dict:
        body = {"model": "demo", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}
        body.update({"temperature": 0, **extra})
        response = requests.post(f"{self.base_url}/v1/chat/completions", json=body, timeout=600)
        response.raise_for_status()
        return response.json()

    def metric(self, name: str) -> float:
        text = requests.get(f"{self.base_url}/metrics", timeout=30).text
        values = [float(m.group(1)) for m in re.finditer(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M)]
        if not values:
            raise KeyError(f"{name} not in /metrics")
        return sum(values)

    def stream_chat(self, content: str, max_tokens: int, progress: list, index: int, **extra) -> str:
        """Streams a chat completion, counting received chunks in ``progress[index]``."""
        body = {"model": "demo", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}
        body.update({"temperature": 0, "stream": True, **extra})
        pieces = []
        with requests.post(f"{self.base_url}/v1/chat/completions", json=body, stream=True, timeout=600) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                delta = json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                pieces.append(delta)
                progress[index] += 1
        return "".join(pieces)


@contextlib.contextmanager
def serve(model: str, *args: str, env: dict | None = None, log_dir: Path, timeout: float = 900):
    port = free_port()
    log_path = log_dir / f"vllm-{port}.log"
    environment = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", **(env or {})}
    command = [VLLM, "serve", model, "--port", str(port), *SERVE_DEFAULTS, *args]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment, start_new_session=True)
    server = Server(f"http://127.0.0.1:{port}", process, log_path)
    try:
        deadline = time.time() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {process.returncode}:\n{server.log()[-3000:]}")
            try:
                if requests.get(f"{server.base_url}/health", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.time() > deadline:
                raise TimeoutError(f"vllm serve not healthy after {timeout} s:\n{server.log()[-3000:]}")
            time.sleep(1)
        yield server
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def run_startup_failure(model: str, *args: str, log_dir: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Runs `vllm serve` expecting it to fail before serving."""
    command = [VLLM, "serve", model, "--port", str(free_port()), *SERVE_DEFAULTS, *args]
    environment = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=environment)


def concurrent_streams(server: Server, prompts: list[str], max_tokens: int, on_progress=None, **extra) -> list[str]:
    """Streams all prompts at once; calls ``on_progress(progress)`` every 0.2 s until all finish."""
    progress = [0] * len(prompts)
    results: list[str | BaseException] = [""] * len(prompts)

    def run(index: int) -> None:
        try:
            results[index] = server.stream_chat(prompts[index], max_tokens, progress, index, **extra)
        except BaseException as exc:  # reported below, in the test's thread
            results[index] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    while any(thread.is_alive() for thread in threads):
        if on_progress is not None:
            on_progress(progress)
        time.sleep(0.2)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results  # type: ignore[return-value]
