"""Send requests to a running server and watch vLLM's own gauges.

Loopback only; bounded in count and time. ``run_load``: fixed-length greedy
completions (the capacity test). ``run_mixed_load``: what an operator's users
send (lengths, chat and completions, streaming, per-request policies, clients
that hang up or give up), for the load test (``tests/e2e/test_load.py``).
"""

from __future__ import annotations

import math
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Self

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


class PeakGauge:
    """Context manager: polls ``name`` on ``/metrics`` in a thread; ``peak`` is its maximum."""

    def __init__(self, url: str, name: str = "vllm:num_requests_running", every_s: float = 0.25):
        self.url, self.name, self.every_s = url, name, every_s
        self.peak = 0.0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        with httpx.Client(timeout=10) as client:
            while not self._done.is_set():
                try:
                    self.peak = max(self.peak, _gauge(client.get(f"{self.url}/metrics").text,
                                                      self.name))
                except httpx.HTTPError:
                    pass
                self._done.wait(self.every_s)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()


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

    start = time.monotonic()
    with PeakGauge(url, every_s=poll_s) as running, \
            ThreadPoolExecutor(max_workers=concurrency or len(prompts)) as pool:
        list(pool.map(send, prompts))
    result.elapsed_s = time.monotonic() - start
    result.max_running = running.peak
    return result


def wait_idle(url: str, timeout: float = 120) -> None:
    """Return once no request runs or waits (and one more engine step has freed pages)."""
    from benchmarks.server import metric

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        running = metric(url, "vllm:num_requests_running") or 0
        waiting = metric(url, "vllm:num_requests_waiting") or 0
        if running == 0 and waiting == 0:
            time.sleep(2)
            return
        time.sleep(0.5)
    raise TimeoutError("server did not drain")


def server_rss_bytes(url: str) -> int:
    """Resident memory of the ``vllm serve`` listening at ``url`` and all its children."""
    import psutil

    port = url.rsplit(":", 1)[1]
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if "serve" in cmd and "--port" in cmd and cmd[cmd.index("--port") + 1] == port:
            return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])
    raise LookupError(f"no vllm serve process on port {port}")


# -- mixed load: what an operator's users send -------------------------------------------

RECORD = "In {year}, {name} moved {km} km to {city} and opened a shop selling {item}."
_NAMES = "Ada Bruno Chen Dara Emil Fatima Goran Hana Ivo Jana Kofi Lena".split()
_CITIES = "Oslo Lima Pune Accra Kyoto Porto Quito Riga Sofia Tunis".split()
_ITEMS = "lamps maps kites bread tea rope glass boots clocks soap".split()


def records(rng: random.Random, tokens: int) -> str:
    """About ``tokens`` tokens of records (one is ~24 tokens with SmolLM2's tokenizer)."""
    return " ".join(RECORD.format(year=rng.randint(1900, 2020), name=rng.choice(_NAMES),
                                  km=rng.randint(2, 999), city=rng.choice(_CITIES),
                                  item=rng.choice(_ITEMS))
                    for _ in range(max(1, tokens // 24)))


@dataclass
class Call:
    """One client request of a mixed load and how it is to behave."""

    seed: int
    tokens: int  # about this many prompt tokens
    max_tokens: int
    chat: bool
    stream: bool
    options: dict  # kv_policy / kv_budget (extra_body)
    behaviour: str  # "complete", "abort" (hang up mid-stream), "disconnect" (give up waiting)


def plan_mixed_load(count: int, seed: int, options: list[dict], min_tokens: int = 100,
                    max_tokens: int = 4000) -> list[Call]:
    """Prompt lengths log-uniform in [min_tokens, max_tokens]; half streamed, half chat;
    10% hang up mid-stream, 5% give up before the answer; options drawn uniformly."""
    rng = random.Random(seed)
    calls = []
    for i in range(count):
        tokens = int(math.exp(rng.uniform(math.log(min_tokens), math.log(max_tokens))))
        draw = rng.random()
        behaviour = "abort" if draw < 0.10 else "disconnect" if draw < 0.15 else "complete"
        calls.append(Call(seed=seed * 100_003 + i, tokens=tokens, max_tokens=rng.randint(4, 48),
                          chat=rng.random() < 0.5,
                          stream=behaviour == "abort" or rng.random() < 0.5,
                          options=rng.choice(options), behaviour=behaviour))
    return calls


def call_body(model: str, call: Call) -> tuple[str, dict]:
    text = records(random.Random(call.seed), call.tokens) + "\nSummarise the records."
    body = {"model": model, "max_tokens": call.max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": call.stream, **call.options}
    if call.chat:
        return "/v1/chat/completions", body | {"messages": [{"role": "user", "content": text}]}
    return "/v1/completions", body | {"prompt": text}


def send_call(url: str, model: str, call: Call, timeout_s: float = 900) -> str:
    """Run one call; returns ``status N``, ``ok``, ``aborted`` or ``disconnected``."""
    return send_body(url, *call_body(model, call), call.behaviour, timeout_s)


def send_body(url: str, path: str, body: dict, behaviour: str, timeout_s: float = 900) -> str:
    """POST ``body`` (streamed if it asks to be) and behave as told (see :class:`Call`);
    returns ``status N``, ``ok``, ``aborted``, ``disconnected`` or ``stream error``."""
    if behaviour == "disconnect":
        try:  # a client that stops waiting: the server sees the connection close
            response = httpx.post(f"{url}{path}", json=body, timeout=0.5)
            return "ok" if response.status_code == 200 else f"status {response.status_code}"
        except httpx.TimeoutException:
            return "disconnected"
    if not body.get("stream"):
        response = httpx.post(f"{url}{path}", json=body, timeout=timeout_s)
        return "ok" if response.status_code == 200 else f"status {response.status_code}"
    with httpx.stream("POST", f"{url}{path}", json=body, timeout=timeout_s) as response:
        if response.status_code != 200:
            return f"status {response.status_code}"
        for i, line in enumerate(response.iter_lines()):
            if behaviour == "abort" and i >= 2:
                return "aborted"  # leaving the block closes the connection
            if line.startswith("data: {") and '"error"' in line:
                return "stream error"
    return "ok"


def run_mixed_load(url: str, model: str, calls: list[Call], concurrency: int = 32
                   ) -> list[str]:
    """Every call, ``concurrency`` at a time, with a progress bar; outcomes in call order."""
    from tqdm import tqdm

    with ThreadPoolExecutor(concurrency) as pool:
        return list(tqdm(pool.map(lambda c: send_call(url, model, c), calls), total=len(calls),
                         desc="requests", mininterval=10))
