"""Options: validation in one place, presets with file:line errors, shipped presets load."""

from __future__ import annotations

from pathlib import Path

import pytest

from vllm_kvcompress.config import KVCompressConfig, PresetError, load_preset, parse_budget

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("text,value", [("0.25", 0.25), ("1", 1.0), ("16", 16), ("512", 512)])
def test_budget_accepts_fractions_and_token_counts(text, value):
    assert parse_budget(text) == value


@pytest.mark.parametrize("text", ["0", "-0.5", "1.5", "15", "100.5"])
def test_budget_rejects_values_outside_both_ranges(text):
    with pytest.raises(ValueError, match="fraction in \\(0, 1\\].*token count >= 16"):
        parse_budget(text)


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
