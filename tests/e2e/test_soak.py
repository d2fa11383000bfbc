"""Hostile requests mixed into normal load, on every policy family's server.

Well-formed requests run concurrently with a stream of hostile ones (bad options, bad
types, deep JSON, options a server cannot run): the hostile ones get a 4xx, nothing gets
a 5xx, the well-formed ones give the same greedy text as when they ran alone, the server
stays healthy and every page comes back.
"""

from __future__ import annotations

import itertools
import json
import random
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from benchmarks.load import wait_idle
from benchmarks.server import metric, vllm_server
from tests.e2e.test_drain import random_prompt

pytestmark = pytest.mark.e2e

HOSTILE = [
    {"kv_budget": 1e308}, {"kv_budget": "1e20"}, {"kv_budget": 10**24}, {"kv_budget": True},
    {"kv_budget": -1}, {"kv_budget": [0.5]}, {"kv_policy": ["snapkv"]}, {"kv_policy": "bogus"},
    {"kv_policy": "x" * 5000}, {"kv_window": 8}, {"vllm_xargs": {"kv_budget": "abc"}},
    {"vllm_xargs": {"kv_policy": {"a": 1}}}, {"vllm_xargs": "not an object"},
    {"kv_budget": 100_000}, {"max_tokens": -5}, {"prompt": None},
]
DEEP = b'{"prompt": "hi", "max_tokens": 1, "a": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"
BROKEN = b'{"prompt": "hi", "kv_budget": '


def send(url: str, model: str, body: dict | bytes) -> int:
    if isinstance(body, dict):
        body = json.dumps({"model": model, "prompt": "hi", "max_tokens": 2, **body}).encode()
    return httpx.post(f"{url}/v1/completions", content=body, timeout=600,
                      headers={"content-type": "application/json"}).status_code


def greedy(url: str, model: str, prompt: str) -> tuple[int, str]:
    response = httpx.post(f"{url}/v1/completions", timeout=600, json={
        "model": model, "prompt": prompt, "max_tokens": 16, "temperature": 0,
        "ignore_eos": True})
    return response.status_code, response.json()["choices"][0]["text"] if response.is_success \
        else response.text


FAMILIES = {
    "h2o": ("--kv-policy", "h2o", "--kv-budget", "0.25"),  # evicts while decoding
    "snapkv": pytest.param(("--kv-policy", "snapkv", "--kv-budget", "0.25"),
                           marks=pytest.mark.slow),  # compresses at prefill end
    "quest": pytest.param(("--kv-policy", "quest", "--kv-budget", "0.25"),
                          marks=pytest.mark.slow),  # selects pages while decoding
    "k8v4": pytest.param(("--kv-quant", "k8v4"), marks=pytest.mark.slow),  # quantized pages
}


@pytest.mark.parametrize("flags", list(FAMILIES.values()), ids=list(FAMILIES))
def test_hostile_requests_among_normal_load_change_nothing(default_model, flags):
    rng = random.Random(9)
    prompts = [random_prompt(rng, rng.randint(100, 300)) for _ in range(4)]
    with vllm_server(default_model, *flags, "--max-model-len", "2048") as url:
        alone = [greedy(url, default_model, p) for p in prompts]
        statuses: list[int] = []
        done = threading.Event()

        def attack() -> None:
            for body in itertools.cycle([*HOSTILE, DEEP, BROKEN]):
                if done.is_set():
                    return
                statuses.append(send(url, default_model, body))

        with ThreadPoolExecutor(2 + len(prompts)) as pool:
            attackers = [pool.submit(attack) for _ in range(2)]
            together = list(pool.map(lambda p: greedy(url, default_model, p), prompts))
            done.set()
            for attacker in attackers:
                attacker.result()
        wait_idle(url)
        policy = flags[1] if flags[0] == "--kv-policy" else "none"
        pages = metric(url, "kvcompress_pages_used", policy=policy)
        health = httpx.get(f"{url}/health", timeout=10).status_code
    assert together == alone and all(status == 200 for status, _ in alone)
    assert len(statuses) >= len(HOSTILE)
    assert not [s for s in statuses if s >= 500], statuses
    assert set(statuses) <= {400, 413, 422}, sorted(set(statuses))
    assert pages == 0 and health == 200
