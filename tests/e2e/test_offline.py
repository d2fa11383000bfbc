"""Offline ``LLM(...)`` with compression, and per-request choices through ``extra_args``."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.e2e

PROMPT = " ".join(f"Item {i}: the warehouse in district {i % 7} stores {i * 3} crates."
                  for i in range(50)) + "\nHow many crates are in item 12?"


@pytest.fixture(scope="module")
def llm(default_model):
    from vllm import LLM

    llm = LLM(default_model, dtype="float32", enforce_eager=True, max_model_len=2048,
              kv_cache_memory_bytes=200_000_000,
              additional_config={"kvcompress": {"policy": "snapkv", "budget": 0.25}})
    yield llm
    llm.llm_engine.engine_core.shutdown()


def test_requests_with_their_own_policies_generate_together(llm):
    from vllm import SamplingParams

    choices = [None, {"kv_policy": "none"}, {"kv_policy": "pyramidkv", "kv_budget": 0.1}]
    params = [SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, extra_args=extra)
              for extra in choices]
    together = llm.generate([PROMPT] * 3, params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in together] == [12, 12, 12]
    alone = [llm.generate(PROMPT, p, use_tqdm=False)[0] for p in params]
    assert [o.outputs[0].token_ids for o in together] == [o.outputs[0].token_ids for o in alone]


def test_a_choice_the_server_cannot_honour_is_a_value_error(llm):
    from vllm import SamplingParams

    with pytest.raises(ValueError, match="kv_policy: 'h2o' cannot run on this server"):
        llm.generate(PROMPT, SamplingParams(max_tokens=4, extra_args={"kv_policy": "h2o"}),
                     use_tqdm=False)
    # The engine is unharmed.
    out = llm.generate("The capital of France is",
                       SamplingParams(max_tokens=6, temperature=0), use_tqdm=False)
    assert "Paris" in out[0].outputs[0].text
