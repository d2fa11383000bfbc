"""Long-context accuracy through the whole stack: a pass key hidden in ~2K tokens.

SnapKV and PyramidKV at 25% must find it as often as the full cache; StreamingLLM
at 25% must miss the middle depths, which shows that tokens were really dropped.
"""

from __future__ import annotations

import httpx
import pytest

from benchmarks.tasks import passkey, score
from benchmarks.server import vllm_server

pytestmark = pytest.mark.e2e

CONTEXT = 2000
MIDDLE = {0.3, 0.5, 0.7}


@pytest.fixture(scope="module")
def samples(default_model):
    from transformers import AutoTokenizer

    return passkey(AutoTokenizer.from_pretrained(default_model), CONTEXT)


def found(default_model, samples, *flags) -> dict[float, bool]:
    with vllm_server(default_model, *flags) as url:
        result = {}
        for sample in samples:
            response = httpx.post(
                f"{url}/v1/completions", timeout=600,
                json={"model": default_model, "prompt": sample.prompt, "max_tokens": 12,
                      "temperature": 0},
            )
            response.raise_for_status()
            result[sample.depth] = score(sample, response.json()["choices"][0]["text"])
    return result


@pytest.fixture(scope="module")
def full_cache(default_model, samples):
    result = found(default_model, samples)
    assert sum(result.values()) >= 4, f"the full cache itself misses the key: {result}"
    return result


# PyramidKV and StreamingLLM take about 2 minutes each: slow (run with -m slow).
@pytest.mark.parametrize("policy", ["snapkv", pytest.param("pyramidkv", marks=pytest.mark.slow)])
def test_quarter_budget_finds_the_key_as_often_as_the_full_cache(
    default_model, samples, full_cache, policy
):
    result = found(default_model, samples, "--kv-policy", policy, "--kv-budget", "0.25")
    assert sum(result.values()) >= sum(full_cache.values()), (result, full_cache)


@pytest.mark.slow
def test_streamingllm_loses_the_middle(default_model, samples, full_cache):
    result = found(default_model, samples, "--kv-policy", "streamingllm", "--kv-budget", "0.25")
    assert not any(result[d] for d in MIDDLE), result
    assert any(full_cache[d] for d in MIDDLE)
