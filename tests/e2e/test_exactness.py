"""A budget that covers the whole prompt gives plain vLLM's greedy tokens; batches don't matter."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.e2e.server import vllm_server

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


def greedy(url: str, model: str, prompt: str) -> list[int]:
    body = {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
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


@pytest.mark.parametrize("policy", ["snapkv", "h2o", "streamingllm"])
def test_budget_covering_the_prompt_gives_plain_vllm_tokens(default_model, plain_tokens, policy):
    # 4096 tokens cover every prompt and its output: nothing is ever evicted.
    with vllm_server(default_model, "--kv-policy", policy, "--kv-budget", "4096") as url:
        assert run_all(url, default_model, concurrent=False) == plain_tokens


def test_output_does_not_depend_on_the_batch(default_model):
    with vllm_server(default_model, "--kv-policy", "pyramidkv", "--kv-budget", "0.25") as url:
        alone = run_all(url, default_model, concurrent=False)
        together = run_all(url, default_model, concurrent=True)
    assert together == alone
