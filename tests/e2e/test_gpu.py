"""The default model served compressed on a CUDA GPU, on vLLM's default runner there
(Model Runner V2): compression engages, a budget covering the prompt gives plain vLLM's
greedy tokens, and eviction is counted. Run with ``-m gpu`` on a CUDA machine with
``pip install -e ".[cuda,test]"``."""

from __future__ import annotations

import httpx
import pytest
import torch

from benchmarks.server import metric, vllm_server

pytestmark = [pytest.mark.e2e, pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

PROMPT = " ".join(f"Item {i}: district {i % 7} stores {i * 3} crates." for i in range(80)) + \
    " How many crates are in item 12?"


def greedy(url: str, model: str) -> list[str]:
    body = {"model": model, "prompt": PROMPT, "max_tokens": 32, "temperature": 0,
            "logprobs": 1, "ignore_eos": True}
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=300)
    response.raise_for_status()
    return response.json()["choices"][0]["logprobs"]["tokens"]


def test_compresses_on_cuda_with_the_default_runner(default_model):
    with vllm_server(default_model, runner="v2") as url:
        plain = greedy(url, default_model)
    with vllm_server(default_model, "--kv-policy", "snapkv", "--kv-budget", "1.0",
                     runner="v2") as url:
        assert greedy(url, default_model) == plain
        text = httpx.get(f"{url}/metrics", timeout=10).text
        assert 'runner="v2"' in text and 'decode_path="triton"' in text
    with vllm_server(default_model, "--kv-policy", "pyramidkv", "--kv-budget", "0.25",
                     runner="v2") as url:
        greedy(url, default_model)
        assert metric(url, "kvcompress_evicted_tokens_total", policy="pyramidkv") > 0
        assert metric(url, "kvcompress_pages_used", policy="pyramidkv") == 0
