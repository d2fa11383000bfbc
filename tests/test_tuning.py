"""The held-out sweep: prompts apart from the grid's, counts, the results table (no vLLM)."""

from __future__ import annotations

import json

import pytest

import benchmarks.tuning as tuning
from benchmarks.report import tuning_section
from benchmarks.tasks import TASKS, Sample
from benchmarks.tuning import held_out_samples, main, plot, tally, value


@pytest.fixture(scope="module")
def tokenizer():
    from vllm_kvcompress.models import default_model_path

    path = default_model_path(build=False)
    if not (path / "tokenizer.json").exists():
        pytest.skip(f"no tokenizer at {path}")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def test_held_out_prompts_share_nothing_with_the_grids(tokenizer):
    tasks = ["multivalue", "vartrack", "commonwords"]
    held_out = held_out_samples(tokenizer, tasks, [1000], 4)
    grid = [s for t in tasks for s in TASKS[t](tokenizer, 1000, depths=[0.125, 0.375, 0.625,
                                                                          0.875])]
    assert len(held_out) == 12 and [s.task for s in held_out] == [s.task for s in grid]
    assert not {s.prompt for s in held_out} & {s.prompt for s in grid}
    assert not {s.answers for s in held_out} & {s.answers for s in grid}
    assert held_out == held_out_samples(tokenizer, tasks, [1000], 4)  # deterministic


def test_tally_splits_by_task_and_context():
    samples = [Sample(t, "p", "a", 0.5, ctx) for t, ctx in
               [("vartrack", 1000), ("qa", 1000), ("vartrack", 2000)]]
    counts = tally(samples, [1.0, 0.5, 0.25])
    assert counts == {"correct": 1.75, "total": 3, "per_task": {"vartrack": 1.25, "qa": 0.5},
                      "per_context": {"1000": 1.5, "2000": 0.25}}


def test_values_read_as_yaml_and_bad_ones_fail_before_a_server_starts():
    assert (value("20"), value("0.5"), value("max")) == (20, 0.5, "max")
    with pytest.raises(ValueError, match="beta must be >= 1"):
        main(["--values", "0.5", "--tasks", "passkey", "--contexts", "200", "--samples", "1"])
    with pytest.raises(ValueError, match="unexpected keyword argument 'slope'"):
        main(["--arg", "slope", "--values", "2", "--tasks", "passkey", "--contexts", "200",
              "--samples", "1"])


def test_the_readme_table_gives_each_value_against_the_full_cache(tmp_path):
    def row(correct, per_context):
        return {"correct": correct, "total": 36, "relative": correct / 10,
                "per_context": dict(zip(("1000", "2000"), per_context))}

    data = {"command": "python -m benchmarks.tuning --values 20 2", "policy": "pyramidkv",
            "arg": "beta", "budget": 0.25, "tasks": ["vartrack"], "context_tokens": [1000, 2000],
            "samples_per_task": 4,
            "configs": {"full": row(10, (6, 4)), "beta=20": row(8, (3, 5)),
                        "beta=2": row(10.5, (6, 4.5))}}
    table = "\n".join(tuning_section(data))
    assert "plain vLLM's full cache in the same run: 10/36" in table
    assert "| full cache | 10/36 | 100% | 6 / 4 |" in table
    assert "| 20 | 8/36 | 80% | 3 / 5 |" in table
    assert "| 2 | 10.5/36 | 105% | 6 / 4.5 |" in table
    plot(data, tmp_path / "tuning.png")
    assert (tmp_path / "tuning.png").stat().st_size > 0


def test_resume_keeps_what_was_measured_and_names_its_command(tokenizer, tmp_path, monkeypatch):
    def no_server(*args, **kwargs):
        raise AssertionError("every value was measured; nothing should start")

    monkeypatch.setattr(tuning, "vllm_server", no_server)
    out = tmp_path / "sweep.json"
    first = "python -m benchmarks.tuning --values 2"
    counts = {"correct": 3.0, "total": 3, "per_task": {"passkey": 3.0},
              "per_context": {"200": 3.0}}
    out.write_text(json.dumps({
        "command": first, "machine": "elsewhere, 64 cores", "policy": "pyramidkv", "arg": "beta",
        "budget": 0.25,
        "tasks": ["passkey"], "context_tokens": [200], "samples_per_task": 3,
        "held_out_seed": tuning.HELD_OUT_SEED,
        "configs": {"full": {"preset": None, **counts}, "beta=2": {"preset": {}, **counts}}}))
    result = main(["--values", "2", "--tasks", "passkey", "--contexts", "200", "--samples", "3",
                   "--resume", "--out", str(out)])
    assert result["resumed_from"] == [first]
    assert result["machine"].endswith(" and elsewhere, 64 cores")
    assert result["configs"]["beta=2"]["relative"] == 1.0
