"""Offline, ``SamplingParams(extra_args=...)`` goes through the same check as HTTP: a
hostile value is a ``ValueError`` at ``generate``, and the engine keeps serving."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def llm(default_model):
    from vllm import LLM

    llm = LLM(default_model, dtype="float32", enforce_eager=True, max_model_len=1024,
              kv_cache_memory_bytes=64_000_000,
              additional_config={"kvcompress": {"policy": "h2o", "budget": 0.25}})
    yield llm
    llm.llm_engine.engine_core.shutdown()


def greedy(llm, **extra) -> str:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=4, temperature=0, extra_args=extra or None)
    return llm.generate("The capital of France is", params, use_tqdm=False)[0].outputs[0].text


@pytest.mark.parametrize("extra,match", [
    ({"kv_budget": 1e308}, "kv_budget: 1e\\+308 is more tokens than any context length"),
    ({"kv_budget": "1e20"}, "kv_budget: '1e20' is more tokens"),
    ({"kv_budget": 2048}, "context length \\(1024\\)"),
    ({"kv_budget": "abc"}, "kv_budget: 'abc' is not a number"),
    ({"kv_budget": float("nan")}, "kv_budget: nan is not a finite number"),
    ({"kv_budget": True}, "kv_budget: True is not a number"),
    ({"kv_policy": ["h2o"]}, "kv_policy: a list is not a policy name"),
    ({"kv_window": 8}, "kv_window: set for the whole server"),
])
def test_hostile_extra_args_are_value_errors(llm, extra, match):
    before = greedy(llm)
    with pytest.raises(ValueError, match=match):
        greedy(llm, **extra)
    assert greedy(llm) == before  # the engine is unharmed
    assert greedy(llm, kv_budget=16)  # and still takes good options
