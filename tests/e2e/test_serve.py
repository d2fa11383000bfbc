"""A real ``vllm serve --kv-policy pyramidkv --kv-budget 0.25`` queried over HTTP."""

from __future__ import annotations

import pytest

from benchmarks.server import metric, vllm_server

pytestmark = pytest.mark.e2e
openai = pytest.importorskip("openai")

LONG_PASSAGE = " ".join(
    f"Item {i}: the warehouse in district {i % 7} stores {i * 3} crates of apples." for i in range(60)
)


@pytest.fixture(scope="module")
def server(default_model):
    with vllm_server(default_model, "--kv-policy", "pyramidkv", "--kv-budget", "0.25") as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", timeout=300)


def test_completion(client, default_model):
    out = client.completions.create(
        model=default_model, prompt="The capital of France is", max_tokens=8, temperature=0
    )
    assert "Paris" in out.choices[0].text


def test_chat(client, default_model):
    out = client.chat.completions.create(
        model=default_model, temperature=0, max_tokens=16,
        messages=[{"role": "user", "content": "What is the capital of France? Answer in one word."}],
    )
    assert "Paris" in out.choices[0].message.content


def test_streaming_matches_non_streaming(client, default_model):
    messages = [{"role": "user", "content": LONG_PASSAGE + "\nHow many crates are in item 12?"}]
    whole = client.chat.completions.create(
        model=default_model, messages=messages, temperature=0, max_tokens=24
    ).choices[0].message.content
    stream = client.chat.completions.create(
        model=default_model, messages=messages, temperature=0, max_tokens=24, stream=True
    )
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert len(pieces) > 1
    assert "".join(pieces) == whole


def test_metrics_show_compression(client, server, default_model):
    client.completions.create(model=default_model, prompt=LONG_PASSAGE, max_tokens=4, temperature=0)
    evicted = metric(server, "kvcompress_evicted_tokens_total", policy="pyramidkv")
    compressed = metric(server, "kvcompress_prompt_tokens_total", policy="pyramidkv")
    assert compressed and compressed >= 800
    # 0.25 of a ~900-token prompt is kept: most of it was evicted.
    assert evicted and evicted > 0.5 * compressed
    assert metric(server, "kvcompress_pages_used", policy="pyramidkv") is not None


def test_bad_request_is_400(client, default_model):
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=default_model, prompt="hi", max_tokens=-1)
