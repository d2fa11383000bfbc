"""``--tensor-parallel-size 2`` on CPU with compression: each rank holds its share of the KV heads.

SmolLM2's 9 query heads do not split over two ranks, so this builds a small
Llama of its own (random weights, SmolLM2's tokenizer, 4 query and 2 KV heads):
the check is mechanical (the same greedy tokens as one rank, pages evicted and
returned), not about answers. Slow: two ranks on two cores.
"""

from __future__ import annotations

import httpx
import pytest

from benchmarks.load import wait_idle
from benchmarks.server import metric, vllm_server

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PROMPT = " ".join(f"Record {i}: district {i % 7} holds {i * 3} crates." for i in range(80))


@pytest.fixture(scope="module")
def split_model(tmp_path_factory, default_model) -> str:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(default_model)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=64, max_position_embeddings=2048, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    path = tmp_path_factory.mktemp("split-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def greedy(url: str, model: str) -> tuple[list[str], float, float]:
    body = {"model": model, "prompt": PROMPT, "max_tokens": 24, "temperature": 0,
            "ignore_eos": True, "logprobs": 1}
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=600)
    response.raise_for_status()
    tokens = response.json()["choices"][0]["logprobs"]["tokens"]
    return (tokens, metric(url, "kvcompress_evicted_tokens_total", policy="snapkv"),
            metric(url, "kvcompress_prompt_tokens_total", policy="snapkv"))


def test_two_ranks_compress_like_one(split_model, monkeypatch):
    flags = ("--kv-policy", "snapkv", "--kv-budget", "0.25", "--max-model-len", "2048")
    with vllm_server(split_model, *flags) as url:
        one, evicted_one, prompt_one = greedy(url, split_model)
    # vLLM's CPU workers bind threads per NUMA node; this machine has one, so one core a rank.
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    with vllm_server(split_model, *flags, "--tensor-parallel-size", "2") as url:
        two, evicted_two, prompt_two = greedy(url, split_model)
        wait_idle(url)
        assert metric(url, "kvcompress_pages_used", policy="snapkv") == 0
    assert prompt_two == prompt_one > 0
    # The counters come from rank 0 alone; its heads keep the same share of the prompt.
    assert evicted_two == pytest.approx(evicted_one)
    assert evicted_one > 0.6 * prompt_one
    assert two == one
