"""Options: validation in one place, presets with file:line errors, shipped presets load."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from vllm_kvcompress.config import (MAX_TOKEN_BUDGET, KVCompressConfig, PresetError,
                                     RequestOptionError, RequestPolicies, load_preset, parse_budget)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("text,value", [("0.25", 0.25), ("1", 1.0), ("16", 16), ("512", 512)])
def test_budget_accepts_fractions_and_token_counts(text, value):
    assert parse_budget(text) == value


@pytest.mark.parametrize("text", ["0", "-0.5", "1.5", "15", "100.5"])
def test_budget_rejects_values_outside_both_ranges(text):
    with pytest.raises(ValueError, match="fraction in \\(0, 1\\].*token count >= 16"):
        parse_budget(text)


@pytest.mark.parametrize("value,match", [
    (1e308, "1e\\+308 is more tokens than any context length"),
    ("1e20", "'1e20' is more tokens than any context length"),
    (10**24, "1000000000000000000000000 is more tokens"),
    (10**400, "an integer of 1329 bits is more tokens"),  # float() of it overflows
    (MAX_TOKEN_BUDGET + 1, "at most 2147483647"),
    (math.inf, "inf is not a finite number"),
    (math.nan, "nan is not a finite number"),
    ("inf", "'inf' is not a finite number"),
    ("nan", "'nan' is not a number"),
    ("abc", "'abc' is not a number"),
    ("1" * 100, "'1111111111111111111111111111111111111111'... is not a number"),
    (True, "True is not a number"),
    (None, "None is not a number"),
    ([0.5], "a list is not a number"),
])
def test_budget_refuses_what_is_no_bounded_number(value, match):
    with pytest.raises(ValueError, match=match):
        parse_budget(value)


def test_largest_budget_is_a_plain_int():
    assert parse_budget(MAX_TOKEN_BUDGET) == MAX_TOKEN_BUDGET
    assert type(parse_budget(float(2**20))) is int and type(parse_budget(1)) is float


def test_unknown_policy_names_the_choices():
    with pytest.raises(ValueError, match="unknown policy 'bogus'.*pyramidkv"):
        KVCompressConfig(policy="bogus")


def test_none_is_disabled_and_builds_no_policy():
    config = KVCompressConfig()
    assert not config.enabled and config.build_policy() is None


def test_flags_override_preset():
    config = KVCompressConfig.from_sources(CONFIGS / "pyramidkv.yaml", {"budget": 0.1, "window": None})
    assert (config.policy, config.budget, config.window) == ("pyramidkv", 0.1, 32)


@pytest.mark.parametrize("preset", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_presets_load(preset):
    config = KVCompressConfig.from_sources(preset)
    built = config.build_policy() or config.build_selector()  # quest evicts nothing
    assert config.enabled and built.name == config.policy


def test_round_trip_through_additional_config():
    config = KVCompressConfig.from_sources(CONFIGS / "snapkv.yaml", {"budget": 64})
    again = KVCompressConfig.from_additional_config({"kvcompress": config.to_additional_config()})
    assert again == config


@pytest.mark.parametrize(
    "text,line,reason",
    [
        ("policy: snapkv\nbudget: 3\n", 2, "budget"),
        ("policy: snapkv\n\nwindow: 0\n", 3, "window"),
        ("policy: nope\n", 1, "unknown policy"),
        ("policy: snapkv\ncolour: red\n", 2, "colour"),
        ("policy: snapkv\npolicy_args:\n  kernel_size: 4\n", 2, "kernel_size"),
        ("policy: snapkv\nbudget: [0.5\n", 3, "invalid YAML"),
        ("- a\n- b\n", 1, "mapping"),
    ],
)
def test_malformed_preset_names_file_line_and_reason(tmp_path, text, line, reason):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(PresetError) as err:
        load_preset(path)
    assert f"{path}:{line}:" in str(err.value)
    assert reason in str(err.value)


def test_quest_alone_reads_its_budget_and_evicts_nothing():
    config = KVCompressConfig(policy="quest", budget=0.25)
    assert config.enabled and config.build_policy() is None
    assert config.build_selector().budget == 0.25 and config.quest_budget == 0.25


def test_decode_budget_composes_quest_with_eviction():
    config = KVCompressConfig(policy="snapkv", budget=0.25, decode_budget=128)
    assert config.build_policy().name == "snapkv" and config.build_selector().budget == 128


@pytest.mark.parametrize("kwargs, match", [
    ({"policy": "h2o", "decode_budget": 64}, "h2o accumulates attention"),
    ({"policy": "quest", "decode_budget": 64}, "already what decode reads"),
    ({"policy": "pod", "decode_budget": 64}, "pod reads distant keys"),
    ({"policy": "snapkv", "decode_budget": 3}, "token count >= 16"),
])
def test_decode_budget_rejections_say_why(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KVCompressConfig(**kwargs)


# -- per-request kv_policy / kv_budget ---------------------------------------------------

def test_requests_may_choose_policies_that_share_the_servers_store():
    prefill_only = ["none", "adakv", "chunkkv", "expected_attention", "keydiff", "knorm", "leankv",
                    "pyramidkv", "rkv", "snapkv", "tova"]
    assert KVCompressConfig(policy="snapkv").request_policies() == prefill_only
    assert KVCompressConfig(quant="k8v4").request_policies() == prefill_only
    assert KVCompressConfig(policy="h2o").request_policies() == ["h2o"]
    assert KVCompressConfig(policy="spindlekv").request_policies() == ["spindlekv"]
    assert KVCompressConfig().request_policies() == []


def test_a_request_config_keeps_the_servers_store_options():
    server = KVCompressConfig(policy="chunkkv", budget=0.25, window=16, quant="k8v4",
                              policy_args={"chunk_size": 8})
    assert server.for_request(None) is server
    assert server.for_request({"kv_budget": None, "other": 1}) is server
    mine = server.for_request({"kv_policy": "pyramidkv", "kv_budget": "0.1"})
    assert (mine.policy, mine.budget, mine.window, mine.page_format) == ("pyramidkv", 0.1, 16, "k8v4")
    assert mine.policy_args == {}  # chunkkv's hyperparameters are not pyramidkv's
    assert server.for_request({"kv_budget": 512}).policy_args == {"chunk_size": 8}


@pytest.mark.parametrize("server,options,match", [
    ({"policy": "snapkv"}, {"kv_policy": "h2o"}, "kv_policy: 'h2o' cannot run.*allowed here: none"),
    ({"policy": "snapkv"}, {"kv_policy": "bogus"}, "kv_policy: 'bogus'.*unknown policy"),
    ({"policy": "snapkv"}, {"kv_policy": "quest"}, "quest's page selection"),
    ({"policy": "snapkv"}, {"kv_budget": 7}, "kv_budget: 7 is neither.*allowed: a fraction"),
    ({"policy": "snapkv"}, {"kv_budget": [0.5]}, "kv_budget: .* is not a number"),
    ({"policy": "snapkv"}, {"kv_budget": True}, "kv_budget: True is not a number"),
    ({}, {"kv_policy": "snapkv"}, "runs plain vLLM; start it with --kv-policy"),
    ({"policy": "quest", "budget": 64}, {"kv_budget": 0.5}, "kv_budget: .*set at start-up"),
    ({"policy": "h2o"}, {"kv_budget": 1e308}, "kv_budget: 1e\\+308 is more tokens than any"),
    ({"policy": "h2o"}, {"kv_budget": "1e20"}, "kv_budget: '1e20' is more tokens than any"),
    ({"policy": "h2o"}, {"kv_budget": 10**24}, "kv_budget: 1000000000000000000000000 is more"),
    ({"policy": "h2o"}, {"kv_budget": "abc"}, "kv_budget: 'abc' is not a number; allowed: a"),
    ({"policy": "h2o"}, {"kv_budget": {"a": 1}}, "kv_budget: a dict is not a number"),
    ({"policy": "h2o"}, {"kv_policy": ["h2o"]}, "kv_policy: a list is not a policy name; "
                                                "allowed here: h2o"),
    ({"policy": "h2o"}, {"kv_policy": "x" * 10_000}, "kv_policy: 'x{40}'\\.\\.\\. cannot run"),
    ({"policy": "h2o"}, {"kv_window": 8}, "kv_window: set for the whole server at start-up "
                                          "\\(--kv-window\\); a request may set kv_policy and"),
    ({"policy": "h2o"}, {"kv_quant": "k4v4"}, "kv_quant: set for the whole server"),
])
def test_request_options_the_server_cannot_honour_say_why(server, options, match):
    with pytest.raises(RequestOptionError, match=match):
        KVCompressConfig(**server).for_request(options)


def test_token_budgets_stop_at_the_context_length():
    server = KVCompressConfig(policy="h2o", budget=0.25)
    assert server.for_request({"kv_budget": 1024}, max_tokens=1024).budget == 1024
    assert server.for_request({"kv_budget": 0.5}, max_tokens=16).budget == 0.5
    with pytest.raises(RequestOptionError, match="kv_budget: 1025 tokens is more than this model's "
                       "context length \\(1024\\); allowed: .* from 16 to 1024") as err:
        server.for_request({"kv_budget": 1025}, max_tokens=1024)
    assert err.value.param == "kv_budget"


def test_request_policies_are_built_once_per_choice():
    policies = RequestPolicies(KVCompressConfig(policy="snapkv", budget=0.25))
    server = policies.resolve(None)
    assert server.name == "snapkv" and policies.resolve({}) is server
    assert policies.of(None) is server
    mine = policies.resolve({"kv_policy": "pyramidkv", "kv_budget": 0.1})
    assert (mine.name, mine.budget) == ("pyramidkv", 0.1)
    assert policies.resolve({"kv_policy": "pyramidkv", "kv_budget": 0.1}) is mine
    assert policies.resolve({"kv_policy": "none"}) is None


def test_request_policies_stay_bounded_when_every_request_sends_a_new_budget():
    policies = RequestPolicies(KVCompressConfig(policy="snapkv", budget=0.25))
    server = policies.resolve(None)
    for i in range(3 * RequestPolicies.MAX_BUILT):
        policies.resolve({"kv_budget": 0.01 + i / 10_000})
        policies.resolve(None)  # kept: used all along
    assert len(policies._built) == RequestPolicies.MAX_BUILT
    assert policies.resolve(None) is server
