"""A real ``vllm serve --kv-policy pyramidkv --kv-budget 0.25`` queried over HTTP."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

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


def evicted_by(client, server, model, requests: list[dict]) -> tuple[float, float]:
    """Tokens evicted and prompt tokens compressed while ``requests`` (extra_body of each)
    run at once."""
    def counters():
        return [metric(server, f"kvcompress_{name}_total", policy="pyramidkv") or 0.0
                for name in ("evicted_tokens", "prompt_tokens")]

    before = counters()
    with ThreadPoolExecutor(len(requests)) as pool:
        list(pool.map(lambda options: client.completions.create(
            model=model, prompt=LONG_PASSAGE, max_tokens=4, temperature=0,
            extra_body=options), requests))
    return tuple(a - b for a, b in zip(counters(), before))


def test_requests_choose_their_own_policy_and_budget(client, server, default_model):
    none, tight, loose, server_default = (
        {"kv_policy": "none"}, {"kv_policy": "snapkv", "kv_budget": 0.1}, {"kv_budget": 0.5}, {})
    assert evicted_by(client, server, default_model, [none]) == (0.0, 0.0)
    evicted = {}
    for name, options in [("tight", tight), ("loose", loose), ("default", server_default)]:
        evicted[name], compressed = evicted_by(client, server, default_model, [options])
        assert compressed >= 800
    assert evicted["tight"] > evicted["default"] > evicted["loose"] > 0
    assert evicted["tight"] > 0.85 * compressed and evicted["loose"] < 0.55 * compressed
    # The same choices in one batch evict what they evict alone: no request takes
    # another's policy or budget.
    together, _ = evicted_by(client, server, default_model, [none, tight, loose, server_default])
    assert together == pytest.approx(evicted["tight"] + evicted["loose"] + evicted["default"])


@pytest.mark.parametrize("options,match", [
    ({"kv_policy": "h2o"}, "kv_policy: 'h2o' cannot run on this server.*allowed here: none"),
    ({"kv_policy": "bogus"}, "unknown policy"),
    ({"kv_budget": 3}, "kv_budget: 3 is neither.*allowed"),
])
def test_bad_request_options_are_400_with_the_reason(client, default_model, options, match):
    with pytest.raises(openai.BadRequestError, match=match):
        client.completions.create(model=default_model, prompt="hi", max_tokens=2,
                                  extra_body=options)
    with pytest.raises(openai.BadRequestError, match=match):
        client.chat.completions.create(model=default_model, max_tokens=2, extra_body=options,
                                       messages=[{"role": "user", "content": "hi"}])
