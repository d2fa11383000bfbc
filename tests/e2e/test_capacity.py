"""Memory is really saved: same KV bytes, 3x the requests at once (vLLM's own gauge)."""

from __future__ import annotations

import math

import pytest

from benchmarks.load import run_load
from tests.e2e.server import vllm_server

pytestmark = pytest.mark.e2e

BLOCK_TOKENS = 32  # both runs: plain vLLM is told --block-size 32, the plugin picks 32 itself
# Bytes of one plain vLLM block of SmolLM2 in float32: 30 layers x 3 KV heads x K+V of
# 64 floats. Ours also store 8 bytes of slot metadata, so the same bytes hold 1.5% fewer.
PLAIN_BLOCK_BYTES = BLOCK_TOKENS * 30 * 3 * 2 * 64 * 4


def distinct_prompts(tokenizer, count: int, tokens: int) -> list[str]:
    """Prompts of about ``tokens`` tokens that share no prefix."""
    prompts = []
    for i in range(count):
        words = [f"record {i}-{j} holds value {(i * 7919 + j * 104729) % 10007}." for j in range(tokens)]
        ids = tokenizer.encode(" ".join(words), add_special_tokens=False)[: tokens - 8]
        prompts.append(f"Batch {i}. " + tokenizer.decode(ids))
    return prompts


def check_capacity(default_model: str, prompt_tokens: int, output_tokens: int, requests: int):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model)
    prompts = distinct_prompts(tokenizer, requests, prompt_tokens)
    # vLLM admits a request when its prompt fits; leave plain vLLM room for just under
    # 3 prompts (block 0 is vLLM's null block), so that it runs 2 at once.
    prompt_blocks = math.ceil(prompt_tokens / BLOCK_TOKENS)
    kv_bytes = 3 * prompt_blocks * PLAIN_BLOCK_BYTES - 1
    runs = {}
    configs = {"plain": ("--block-size", str(BLOCK_TOKENS)),
               "pyramidkv": ("--kv-policy", "pyramidkv", "--kv-budget", "0.25")}
    for name, flags in configs.items():
        max_len = str(2 ** math.ceil(math.log2(prompt_tokens + output_tokens + 64)))
        with vllm_server(default_model, *flags, "--max-model-len", max_len, kv_bytes=kv_bytes) as url:
            runs[name] = run_load(url, default_model, prompts, output_tokens)
    for name, run in runs.items():
        assert not run.failed, f"{name}: {run.failed[:3]}"
        assert run.completed == requests and run.output_tokens == requests * output_tokens
    plain, compressed = runs["plain"].max_running, runs["pyramidkv"].max_running
    print(f"\nmax running requests in {kv_bytes} KV bytes: plain {plain:.0f}, pyramidkv@0.25 "
          f"{compressed:.0f} ({compressed / plain:.1f}x)")
    assert plain >= 1
    assert compressed >= 3 * plain


def test_pyramidkv_quarter_budget_runs_3x_the_requests(default_model):
    check_capacity(default_model, prompt_tokens=1000, output_tokens=40, requests=8)


@pytest.mark.slow
def test_pyramidkv_quarter_budget_runs_3x_the_requests_at_3k_tokens(default_model):
    check_capacity(default_model, prompt_tokens=3000, output_tokens=64, requests=9)
