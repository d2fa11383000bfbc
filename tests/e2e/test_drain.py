"""Random lengths, streaming, aborts and tight memory: no errors, and every page comes back."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from benchmarks.load import send_body, wait_idle
from benchmarks.server import metric, vllm_server

pytestmark = pytest.mark.e2e

WORDS = "river stone lantern copper meadow violet harbor echo saddle thimble orchard quartz".split()


def random_prompt(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)) + ". Continue:"


def one_request(url: str, model: str, seed: int) -> str:
    """Complete, or stream a few chunks and hang up; returns what happened."""
    rng = random.Random(seed)
    body = {"model": model, "prompt": random_prompt(rng, rng.randint(20, 700)),
            "max_tokens": rng.randint(4, 48), "temperature": 0, "ignore_eos": True}
    behaviour = "complete"
    if rng.random() < 0.3:
        body["stream"], behaviour = True, "abort"
    return send_body(url, "/v1/completions", body, behaviour, timeout_s=600)


@pytest.mark.parametrize("policy", ["pyramidkv", pytest.param("h2o", marks=pytest.mark.slow)])
def test_random_load_drains_to_an_empty_pool(default_model, policy):
    # About 3K tokens of KV: requests queue, and decode growth forces preemptions.
    with vllm_server(default_model, "--kv-policy", policy, "--kv-budget", "0.25",
                     "--max-model-len", "2048", kv_bytes=140_000_000) as url:
        with ThreadPoolExecutor(8) as pool:
            outcomes = list(pool.map(lambda s: one_request(url, default_model, s), range(24)))
        assert not [o for o in outcomes if o.startswith("status")], outcomes
        assert "aborted" in outcomes
        wait_idle(url)
        print(f"\n{policy}: outcomes {sorted(set(outcomes))}, preemptions "
              f"{metric(url, 'vllm:num_preemptions_total')}")
        assert metric(url, "kvcompress_pages_used", policy=policy) == 0
        assert metric(url, "vllm:kv_cache_usage_perc") == 0
        # The server still answers correctly afterwards.
        after = httpx.post(f"{url}/v1/completions", timeout=120, json={
            "model": default_model, "prompt": "The capital of France is", "max_tokens": 6,
            "temperature": 0}).json()
        assert "Paris" in after["choices"][0]["text"]
