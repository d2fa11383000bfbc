"""Memory is really saved: in the KV bytes where plain vLLM runs k requests at once,
compression runs a multiple of k (read from vLLM's own running-requests gauge), and
every request completes."""

from __future__ import annotations

import math

import pytest

from benchmarks.load import run_load
from benchmarks.server import vllm_server

pytestmark = pytest.mark.e2e

BLOCK_TOKENS = 32  # plain vLLM is told --block-size 32; the plugin picks 32 itself
# Bytes of one plain vLLM block of SmolLM2 in float32: 30 layers x 3 KV heads x K+V of
# 64 floats.
PLAIN_BLOCK_BYTES = BLOCK_TOKENS * 30 * 3 * 2 * 64 * 4
OUTPUT_TOKENS = 40


def distinct_prompts(tokenizer, count: int, tokens: int) -> list[str]:
    """Prompts of about ``tokens`` tokens that share no prefix."""
    prompts = []
    for i in range(count):
        words = [f"record {i}-{j} holds value {(i * 7919 + j * 104729) % 10007}." for j in range(tokens)]
        ids = tokenizer.encode(" ".join(words), add_special_tokens=False)[: tokens - 8]
        prompts.append(f"Batch {i}. " + tokenizer.decode(ids))
    return prompts


class Capacity:
    """Runs the same prompts through servers that share one KV space."""

    def __init__(self, model: str, prompt_tokens: int):
        from transformers import AutoTokenizer

        self.model = model
        self.prompt_tokens = prompt_tokens
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        # vLLM admits a request when its prompt fits; leave plain vLLM room for just under
        # 3 prompts (block 0 is vLLM's null block), so that it runs 2 at once.
        self.kv_bytes = 3 * math.ceil(prompt_tokens / BLOCK_TOKENS) * PLAIN_BLOCK_BYTES - 1
        self.max_len = str(2 ** math.ceil(math.log2(prompt_tokens + OUTPUT_TOKENS + 64)))

    def max_running(self, requests: int, *flags: str, runner: str | None = None) -> float:
        prompts = distinct_prompts(self.tokenizer, requests, self.prompt_tokens)
        with vllm_server(self.model, *flags, "--max-model-len", self.max_len,
                         kv_bytes=self.kv_bytes, runner=runner) as url:
            run = run_load(url, self.model, prompts, OUTPUT_TOKENS)
        assert not run.failed, run.failed[:3]
        assert run.completed == requests and run.output_tokens == requests * OUTPUT_TOKENS
        return run.max_running


@pytest.fixture(scope="module")
def capacity(default_model):
    cap = Capacity(default_model, prompt_tokens=1000)
    cap.plain = cap.max_running(4, "--block-size", str(BLOCK_TOKENS))
    assert cap.plain == 2
    return cap


CASES = {
    "pyramidkv@0.25": (3, ("--kv-policy", "pyramidkv", "--kv-budget", "0.25")),
    "k8v4": (2.5, ("--kv-quant", "k8v4")),
    "snapkv@0.25+k8v4": pytest.param(
        8, ("--kv-policy", "snapkv", "--kv-budget", "0.25", "--kv-quant", "k8v4"),
        marks=pytest.mark.slow),
}


@pytest.mark.parametrize("ratio,flags", list(CASES.values()), ids=list(CASES))
def test_compression_runs_more_requests_in_the_same_memory(capacity, ratio, flags):
    target = math.ceil(ratio * capacity.plain)
    running = capacity.max_running(target + 2, *flags)
    print(f"\n{' '.join(flags)}: {running:.0f} at once vs plain vLLM {capacity.plain:.0f} "
          f"in {capacity.kv_bytes} KV bytes ({running / capacity.plain:.1f}x)")
    assert running >= target


@pytest.mark.slow
def test_pyramidkv_quarter_budget_runs_3x_the_requests_at_3k_tokens(default_model):
    cap = Capacity(default_model, prompt_tokens=3000)
    plain = cap.max_running(4, "--block-size", str(BLOCK_TOKENS))
    running = cap.max_running(9, "--kv-policy", "pyramidkv", "--kv-budget", "0.25")
    print(f"\n3K tokens: pyramidkv@0.25 {running:.0f} at once vs plain vLLM {plain:.0f}")
    assert running >= 3 * plain
