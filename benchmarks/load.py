"""Send a batch of requests to a running server and watch vLLM's own gauges.

Loopback only; bounded in count and time. Used by the capacity test and the
throughput benchmark.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx


@dataclass
class LoadResult:
    completed: int = 0
    failed: list[str] = field(default_factory=list)
    max_running: float = 0.0
    output_tokens: int = 0
    elapsed_s: float = 0.0
    latencies_s: list[float] = field(default_factory=list)


def _gauge(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rpartition(" ")[2])
    return total


def run_load(
    url: str,
    model: str,
    prompts: list[str],
    max_tokens: int,
    concurrency: int | None = None,
    timeout_s: float = 1800,
    poll_s: float = 0.25,
) -> LoadResult:
    """Complete every prompt (greedy, fixed output length) while polling /metrics."""
    result = LoadResult()
    done = threading.Event()

    def poll() -> None:
        with httpx.Client(timeout=10) as client:
            while not done.is_set():
                try:
                    text = client.get(f"{url}/metrics").text
                    running = _gauge(text, "vllm:num_requests_running")
                    result.max_running = max(result.max_running, running)
                except httpx.HTTPError:
                    pass
                done.wait(poll_s)

    def send(prompt: str) -> None:
        start = time.monotonic()
        try:
            response = httpx.post(
                f"{url}/v1/completions",
                json={"model": model, "prompt": prompt, "max_tokens": max_tokens,
                      "temperature": 0, "ignore_eos": True},
                timeout=timeout_s,
            )
            response.raise_for_status()
            body = response.json()
            result.output_tokens += body["usage"]["completion_tokens"]
            result.completed += 1
            result.latencies_s.append(time.monotonic() - start)
        except (httpx.HTTPError, KeyError) as exc:
            result.failed.append(repr(exc))

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=concurrency or len(prompts)) as pool:
        list(pool.map(send, prompts))
    result.elapsed_s = time.monotonic() - start
    done.set()
    poller.join()
    return result
