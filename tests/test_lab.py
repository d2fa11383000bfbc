"""The policy lab: configuration parsing, masked attention, prefill mass, decode caps, and
agreement with transformers' own greedy decoding when nothing is evicted."""

from __future__ import annotations

import types

import pytest
import torch

from benchmarks import lab as lab_module
from benchmarks.lab import Lab, _Decode, parse_config
from benchmarks.tasks import passkey
from vllm_kvcompress.policies import build_policy


def test_a_config_names_a_policy_its_budget_and_fields():
    config = parse_config("snapkv@0.25:kernel_size=21,pooling=avg,window=64")
    policy = config.policy
    assert (policy.name, policy.budget, policy.kernel_size, policy.pooling, policy.window) == (
        "snapkv", 0.25, 21, "avg", 64)
    assert parse_config("pyramidkv@0.1:beta=2.5").policy.beta == 2.5


@pytest.mark.parametrize("text, reason", [
    ("snapkv", "policy@budget"),
    ("snapkv@0.25:kernel_size", "not key=value"),
    ("snapkv@0.25:nonsense=3", "nonsense"),
    ("bogus@0.25", "unknown policy"),
    ("snapkv@3", "budget"),
    ("quest@0.25", "cannot emulate quest"),
    ("spindlekv@0.25", "cannot emulate spindlekv"),
    ("pod@0.25", "cannot emulate pod"),
])
def test_a_bad_config_fails_with_the_reason(text, reason):
    with pytest.raises(ValueError, match=reason):
        parse_config(text)


def _bare_lab(decode: _Decode | None = None) -> Lab:
    """A Lab without a model, for its attention function alone."""
    lab = Lab.__new__(Lab)
    lab.decode, lab.queries, lab.mass, lab.window, lab.want_mass = decode, {}, {}, 4, False
    return lab


def test_masked_decode_attention_is_attention_over_the_kept_keys_alone():
    torch.manual_seed(0)
    heads, groups, tokens, dim = 2, 3, 20, 16
    keep = torch.rand(heads, tokens - 1) < 0.5
    lab = _bare_lab(_Decode(None, (tokens,), [keep]))
    query = torch.randn(1, heads * groups, 1, dim)
    key, value = torch.randn(1, heads, tokens, dim), torch.randn(1, heads, tokens, dim)
    out, _ = lab._attention(types.SimpleNamespace(layer_idx=0), query, key, value, None,
                            scaling=dim ** -0.5)
    for h in range(heads * groups):
        kv = h // groups
        kept = torch.cat([keep[kv], torch.tensor([True])])  # the new token is always kept
        probs = (query[0, h, 0] @ key[0, kv, kept].T * dim ** -0.5).softmax(-1)
        torch.testing.assert_close(out[0, 0, h], probs @ value[0, kv, kept])
    assert lab.decode.keep[0].shape == (heads, tokens)  # the new slot joins the row


def test_prefill_mass_is_every_query_s_attention_summed_per_group():
    torch.manual_seed(1)
    heads, groups, tokens, dim = 2, 2, 37, 8
    query = torch.randn(heads * groups, tokens, dim)
    keys = torch.randn(heads * groups, tokens, dim)
    causal = torch.ones(tokens, tokens, dtype=torch.bool).tril()
    probs = (query @ keys.transpose(-1, -2) * 0.3).masked_fill(~causal, -torch.inf).softmax(-1)
    expected = probs.sum(1).view(heads, groups, tokens).sum(1)
    old = lab_module.MASS_CHUNK
    lab_module.MASS_CHUNK = 10  # several blocks, the last one short
    try:
        torch.testing.assert_close(Lab._prefill_mass(query, keys, 0.3, groups), expected)
    finally:
        lab_module.MASS_CHUNK = old


def test_a_capped_policy_evicts_back_to_its_cap_keeping_sinks_and_newest():
    policy = build_policy("streamingllm", budget=16, window=8, sink_tokens=2)
    keep = torch.ones(3, 20, dtype=torch.bool)
    state = _Decode(policy, (16,), [keep])
    kept = Lab._evict(state, 0, keep)
    assert kept.sum(1).tolist() == [16, 16, 16]
    expected = torch.zeros(20, dtype=torch.bool)
    expected[:2] = expected[-14:] = True
    assert (kept == expected).all()


@pytest.mark.e2e
def test_with_nothing_evicted_the_lab_decodes_as_transformers_does(default_model, tmp_path):
    from transformers import AutoModelForCausalLM

    configs = [parse_config("snapkv@1.0"), parse_config("streamingllm@0.25")]
    result = lab_module.run(configs, ["passkey"], [300], 1, False, tmp_path / "lab.json", "test",
                            model_path=default_model)
    lab = Lab(default_model)
    sample = passkey(lab.tokenizer, 300, depths=(0.5,))[0]
    ids = lab.tokenizer(sample.prompt, return_tensors="pt").input_ids
    reference = AutoModelForCausalLM.from_pretrained(default_model, dtype=torch.float32,
                                                     attn_implementation="sdpa")
    generated = reference.generate(ids, max_new_tokens=sample.max_tokens, do_sample=False)
    text = lab.tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True)
    (full, kept), (same, kept_same), (_, kept_quarter) = lab.run_prompt(
        sample, [lab_module.Config("full", None), *configs])
    assert full == same == text
    assert kept == kept_same == 1.0
    assert kept_quarter == pytest.approx(0.25, abs=0.02)
    rows = result["configs"]
    assert rows["full"]["relative"] == 1.0
    assert rows["snapkv@1.0"]["correct"] == rows["full"]["correct"]
    assert (tmp_path / "lab.json").exists()
