"""A failure stays with its request: a policy made to raise for one request (test-only fault
injection) ends that request with an error while the others, running beside it, complete
with the same text as without it, the server stays healthy and every page comes back."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from benchmarks.load import wait_idle
from benchmarks.server import metric, vllm_server
from tests.e2e.test_drain import random_prompt

pytestmark = pytest.mark.e2e

FAULTS = {"KVCOMPRESS_TEST_FAULTS": "1"}


def complete(url: str, model: str, prompt: str, fault: str | None = None) -> tuple[int, str]:
    body = {"model": model, "prompt": prompt, "max_tokens": 24, "temperature": 0,
            "ignore_eos": True}
    if fault:
        body["vllm_xargs"] = {"kvcompress_test_fault": fault}
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=600)
    if response.status_code != 200:
        return response.status_code, response.text
    return 200, response.json()["choices"][0]["text"]


@pytest.mark.parametrize("policy,faults", [
    ("h2o", ("select", "slot_scores")),  # at prefill end, and while decoding at budget
    pytest.param("snapkv", ("select",), marks=pytest.mark.slow),
])
def test_a_failing_request_ends_alone(default_model, policy, faults):
    rng = random.Random(5)
    prompts = [random_prompt(rng, rng.randint(150, 400)) for _ in range(6)]
    with vllm_server(default_model, "--kv-policy", policy, "--kv-budget", "0.25",
                     env=FAULTS) as url:
        with ThreadPoolExecutor(len(prompts)) as pool:
            clean = list(pool.map(lambda p: complete(url, default_model, p), prompts))
        # The same requests again, with faulty ones among them, all at once.
        jobs = [(p, None) for p in prompts] + [(prompts[i], f) for i, f in enumerate(faults)]
        with ThreadPoolExecutor(len(jobs)) as pool:
            mixed = list(pool.map(lambda job: complete(url, default_model, *job), jobs))
        wait_idle(url)
        errors = metric(url, "kvcompress_request_errors_total", policy=policy)
        pages = metric(url, "kvcompress_pages_used", policy=policy)
        health = httpx.get(f"{url}/health", timeout=10).status_code
        after = complete(url, default_model, prompts[0])
    assert all(status == 200 for status, _ in clean)
    assert mixed[:len(prompts)] == clean  # the others: same text as without the fault
    assert all(status == 500 for status, _ in mixed[len(prompts):]), mixed[len(prompts):]
    assert errors == len(faults)
    assert pages == 0 and health == 200 and after == clean[0]


def test_fault_injection_is_off_unless_asked_for(default_model):
    with vllm_server(default_model, "--kv-policy", "snapkv", "--kv-budget", "0.25") as url:
        status, _ = complete(url, default_model, "The capital of France is", fault="select")
        assert status == 200
        assert not metric(url, "kvcompress_request_errors_total", policy="snapkv")
