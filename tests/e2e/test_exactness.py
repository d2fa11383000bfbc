"""Outputs that must not change: a budget covering the prompt gives plain vLLM's greedy tokens,
and a compressed request's tokens depend neither on its batch nor on being preempted."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from benchmarks.server import metric, vllm_server
from tests.e2e.test_drain import random_prompt

pytestmark = pytest.mark.e2e

MAX_TOKENS = 32


def prompts() -> list[str]:
    story = (
        "Mara kept bees on the hill above the harbour. Every spring she counted the hives, "
        "wrote the number in a blue notebook and sold the first honey to the baker. "
    )
    return [
        "The capital of France is",
        "List three prime numbers:",
        story * 4 + "What did Mara write in the notebook?",
        story * 12 + "Who bought the first honey?",
        "def fibonacci(n):\n    ",
        story * 30 + "Summarise the story in one sentence.",
    ]


def greedy(url: str, model: str, prompt: str, max_tokens: int = MAX_TOKENS) -> list[str]:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "logprobs": 1, "ignore_eos": True}
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=600)
    response.raise_for_status()
    return response.json()["choices"][0]["logprobs"]["tokens"]


def run_all(url: str, model: str, concurrent: bool) -> list[list[int]]:
    if not concurrent:
        return [greedy(url, model, p) for p in prompts()]
    with ThreadPoolExecutor(len(prompts())) as pool:
        return list(pool.map(lambda p: greedy(url, model, p), prompts()))


@pytest.fixture(scope="module")
def plain_tokens(default_model):
    with vllm_server(default_model) as url:
        return run_all(url, default_model, concurrent=False)


@pytest.mark.parametrize(
    "policy", ["snapkv", *(pytest.param(p, marks=pytest.mark.slow) for p in ("h2o", "streamingllm"))]
)
def test_budget_covering_the_prompt_gives_plain_vllm_tokens(default_model, plain_tokens, policy):
    # 4096 tokens cover every prompt and its output: nothing is ever evicted.
    with vllm_server(default_model, "--kv-policy", policy, "--kv-budget", "4096") as url:
        assert run_all(url, default_model, concurrent=False) == plain_tokens


def test_chunked_prefill_gives_the_same_tokens(default_model, plain_tokens):
    flags = ("--kv-policy", "snapkv", "--kv-budget", "4096", "--max-num-batched-tokens", "96")
    with vllm_server(default_model, *flags) as url:
        assert run_all(url, default_model, concurrent=False) == plain_tokens


PYRAMID = ("--kv-policy", "pyramidkv", "--kv-budget", "0.25", "--max-model-len", "1536")


def long_requests() -> list[str]:
    rng = random.Random(7)
    return [random_prompt(rng, rng.randint(550, 650)) for _ in range(6)]


@pytest.fixture(scope="module")
def pyramid_url(default_model):
    with vllm_server(default_model, *PYRAMID, kv_bytes=400_000_000) as url:
        yield url


def test_output_does_not_depend_on_the_batch(default_model, pyramid_url):
    alone = run_all(pyramid_url, default_model, concurrent=False)
    together = run_all(pyramid_url, default_model, concurrent=True)
    assert together == alone


@pytest.mark.slow  # about 5 minutes: 6 long requests twice, one run preempting
def test_preempted_requests_recompute_to_the_same_tokens(default_model, pyramid_url):
    """Decode growth overflows a small KV space: vLLM preempts, recomputes, and the
    compressed prompt comes back the same."""
    def outputs(url):
        with ThreadPoolExecutor(6) as pool:
            return list(pool.map(lambda p: greedy(url, default_model, p, 300), long_requests()))

    roomy = outputs(pyramid_url)
    with vllm_server(default_model, *PYRAMID, kv_bytes=80_000_000) as url:
        tight = outputs(url)
        preemptions = metric(url, "vllm:num_preemptions_total")
    assert preemptions and preemptions >= 1
    assert tight == roomy
