"""The generated long-context tasks: deterministic, the answer hidden at the stated depth.

Tokenizer checks use the default model's tokenizer when it is on this machine
(skipped otherwise); nothing here starts vLLM.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import pytest

from benchmarks.tasks import _WORDS, DEFAULT_TASKS, TASKS, Sample, score

NEEDLE_TASKS = sorted(set(TASKS) - {"commonwords"})  # commonwords has no needle
DEPTHS8 = [(i + 0.5) / 8 for i in range(8)]  # benchmarks.accuracy's depths for --samples 8


@pytest.fixture(scope="module")
def tokenizer():
    from vllm_kvcompress.models import default_model_path

    path = default_model_path(build=False)
    if not (path / "tokenizer.json").exists():
        pytest.skip(f"no tokenizer at {path}")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def _question(sample: Sample) -> tuple[str, str]:
    """(everything before the last paragraph, the last paragraph): kvpress's split."""
    cut = sample.prompt.rfind("\n\n")
    assert cut > 0
    return sample.prompt[:cut], sample.prompt[cut:]


@pytest.mark.parametrize("task", sorted(TASKS))
def test_tasks_are_deterministic_and_hide_the_answer_at_its_depth(task):
    first, again = TASKS[task](None, 2000), TASKS[task](None, 2000)
    assert first == again
    assert [s.prompt for s in TASKS[task](None, 2000, seed=99)] != [s.prompt for s in first]
    depths = [s.depth for s in first]
    assert depths == sorted(depths)
    offsets = []
    for sample in first:
        assert sample.task == task and sample.answer == sample.answers[0]
        context, question = _question(sample)
        for answer in sample.answers:
            assert answer in context and answer not in question
        offsets.append(sample.prompt.index(sample.answer) / len(sample.prompt))
    if task in NEEDLE_TASKS:
        assert offsets == sorted(offsets)  # deeper needles sit later in the prompt


@pytest.mark.parametrize("context", [1000, 4000])
@pytest.mark.parametrize("task", sorted(TASKS))
def test_prompts_are_about_as_long_as_asked(task, context, tokenizer):
    samples = TASKS[task](tokenizer, context, depths=(0.0, 0.25, 0.5, 0.75, 1.0))
    assert samples == TASKS[task](tokenizer, context, depths=(0.0, 0.25, 0.5, 0.75, 1.0))
    for sample in samples:
        length = len(tokenizer.encode(sample.prompt, add_special_tokens=False))
        assert abs(length - context) <= 0.1 * context, (sample.depth, length)
        assert sample.prompt.endswith("<|im_start|>assistant\n")
        context_part, question = _question(sample)
        assert all(a in context_part and a not in question for a in sample.answers)


# sha256 of json.dumps([[task, prompt, answer, depth, context_tokens], ...]) as generated
# before the RULER tasks were added: results measured since stay comparable.
ANCHORS = {
    ("passkey", None, 2000, "default"):
        "b43921862a11bf78a3b2bd9c8548f86b3b78bf9d79ec19eb86aebf3cad0bfbb1",
    ("passkey", None, 4000, "8"):
        "841dcfea45dcc1ffc51d94c9e39181ab31807eb67d88d8fe4338976f12f52a64",
    ("multikey", None, 2000, "default"):
        "a77d57dda7fdc0071a05e554ad89a3c6987444817aa92384d6cbe6a0d05370d3",
    ("multikey", None, 4000, "8"):
        "85955e485d5e31de5fa1f1f88057f4e5fa2223abc1475f48576a7c54d2227815",
    ("passkey", "tok", 1000, "default"):
        "b709400345aefda9f7d0b75f0edd717952e6f2c8d692daf266d6bba708f89a31",
    ("passkey", "tok", 2000, "8"):
        "151725864f10f095a2e1b104ff05a12b2186d519c1aa28b6cfd81f4ec2643352",
    ("passkey", "tok", 4000, "default"):
        "538f1331d494759ef32e245d300bfc591d1ae1a019656591fd679e652c1ea2aa",
    ("multikey", "tok", 1000, "default"):
        "5c1198db983b6a46f6cc066da724bb18f396b14012cfae1c122f3bf39d6085cf",
    ("multikey", "tok", 2000, "8"):
        "18050465956aeecea569012c38f4b6d7b19935d6e3b48f1f7403d23a3f7c0f6c",
    ("multikey", "tok", 4000, "default"):
        "620e1a00473d55d7bfcc350bc0634d2ce37f84c2cdede7ff2cbc517f613161ab",
}


def _digest(samples) -> str:
    rows = [[s.task, s.prompt, s.answer, s.depth, s.context_tokens] for s in samples]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


@pytest.mark.parametrize("key", sorted(ANCHORS, key=str), ids=lambda k: "-".join(map(str, k)))
def test_passkey_and_multikey_prompts_are_unchanged(key, request):
    task, tok, context, depths = key
    tokenizer = request.getfixturevalue("tokenizer") if tok else None
    kwargs = {} if depths == "default" else {"depths": DEPTHS8}
    assert _digest(TASKS[task](tokenizer, context, **kwargs)) == ANCHORS[key]


def test_defaults_stay_the_published_tasks():
    assert DEFAULT_TASKS == ("passkey", "multikey")
    assert set(DEFAULT_TASKS) <= set(TASKS)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_score_is_the_share_of_the_answers_found(task):
    for sample in TASKS[task](None, 1000):
        assert score(sample, " " + ", ".join(sample.answers) + ".") == 1
        assert score(sample, ", ".join(sample.answers).upper()) == 1  # case aside, as RULER
        assert score(sample, "I do not know.") == 0
        n = len(sample.answers)
        for found in range(n):  # RULER's string_match_all: partial credit
            assert score(sample, " ".join(sample.answers[:found])) == pytest.approx(found / n)


def test_old_samples_score_as_before():
    sample = Sample("passkey", "prompt", "12345", 0.5, 2000)
    assert sample.answers == ("12345",) and sample.max_tokens == 12
    assert score(sample, "It is 12345.") and not score(sample, "1234 5")


def test_commonwords_asks_for_the_most_frequent_words():
    for other, word in ((a, b) for a in _WORDS for b in _WORDS if a != b):
        assert other not in word  # no false match by substring
    for context in (1000, 4000):
        for sample in TASKS["commonwords"](None, context):
            assert len(sample.answers) == 10
            context_part, question = _question(sample)
            listed = re.findall(r"(\d+)\. ([a-z]+)", context_part)
            assert [int(i) for i, _ in listed] == list(range(1, len(listed) + 1))
            counts = Counter(w for _, w in listed)
            top = {w for w, _ in counts.most_common(10)}
            assert top == set(sample.answers)
            rest = max(c for w, c in counts.items() if w not in top)
            assert min(counts[w] for w in top) >= 3 * rest
            assert not any(w in question.lower() for w in _WORDS)


def test_vartrack_chain_resolves_to_the_names_asked_for():
    for sample in TASKS["vartrack"](None, 2000):
        context_part, question = _question(sample)
        value = re.search(r"the value (\d+)", question).group(1)
        holds = {}
        for name, source in re.findall(r"VAR ([A-Z]{5}) = (VAR [A-Z]{5}|\d+)", context_part):
            holds[name] = holds[source[4:]] if source.startswith("VAR ") else source
        assert len(holds) == 5
        assert {n for n, v in holds.items() if v == value} == set(sample.answers)
        first = context_part.index(f"VAR {sample.answers[0]} = {value}")
        assert first == min(context_part.index(f"VAR {n} =") for n in sample.answers)


def test_multivalue_lists_four_distinct_values_for_one_label():
    for sample in TASKS["multivalue"](None, 2000):
        label = re.search(r"pass keys for (\w+)\?", sample.prompt).group(1)
        assert len(set(sample.answers)) == 4
        for value in sample.answers:
            assert sample.prompt.count(value) == 1
            assert f"One of the pass keys for {label} is {value}." in sample.prompt


def test_kvretrieval_asks_for_the_pair_at_the_depth():
    for sample in TASKS["kvretrieval"](None, 2000):
        data = json.loads(sample.prompt[sample.prompt.index("{"):sample.prompt.rindex("}") + 1])
        key = re.search(r'the key "([0-9a-f-]{36})"', sample.prompt).group(1)
        assert data[key] == sample.answer and sample.prompt.count(sample.answer) == 1
        assert list(data).index(key) == min(len(data) - 1, int(len(data) * sample.depth))
        assert len(data) > 20


def test_qa_asks_about_one_person_and_one_city():
    for sample in TASKS["qa"](None, 2000):
        person = re.search(r"Which city did (.+) move to\?", sample.prompt).group(1)
        records = [line for line in sample.prompt.splitlines() if ", a " in line]
        theirs = [line for line in records if line.startswith(person + ",")]
        assert len(theirs) == 1 and f"moved to {sample.answer} in" in theirs[0]
        assert sample.prompt.count(sample.answer) == 1
        assert records.index(theirs[0]) == min(len(records) - 1,
                                               int(len(records) * sample.depth))


# --- benchmarks.accuracy's results file: old layout still read, several contexts added up ---

def _fake_measure(samples_per_task: int, tasks, correct: int) -> dict:
    from benchmarks.accuracy import measure

    samples = [Sample(t, "", "x", (i + 0.5) / samples_per_task, 0)
               for t in tasks for i in range(samples_per_task)]
    flags = [i < correct for i in range(len(samples))]
    return measure(samples, flags, tasks)


def test_the_published_results_round_trip():
    from benchmarks.accuracy import combine, earlier_measures

    path = Path(__file__).parents[1] / "results" / "accuracy.json"
    if not path.exists():
        pytest.skip("no results/accuracy.json")
    data = json.loads(path.read_text())
    contexts = [data["context_tokens"]]
    measured = earlier_measures(data, data["tasks"], data["samples_per_task"], contexts)
    assert combine(measured, contexts, data["tasks"]) == data["configs"]
    # Resuming with more contexts keeps the published context's measurements.
    more = earlier_measures(data, data["tasks"], data["samples_per_task"], [1000] + contexts)
    assert set(more) == set(data["configs"])
    # A subset of its tasks is served from its samples; a task it lacks is not.
    alone = combine(earlier_measures(data, ["passkey"], data["samples_per_task"], contexts),
                    contexts, ["passkey"])
    assert {n: r["correct"] for n, r in alone.items()} == {
        n: r["per_task"]["passkey"] for n, r in data["configs"].items()}
    assert earlier_measures(data, ["passkey", "qa"], data["samples_per_task"], contexts) == {}
    assert earlier_measures(data, data["tasks"], data["samples_per_task"] + 1, contexts) == {}


def test_several_contexts_add_up_and_the_report_reads_them():
    from benchmarks.accuracy import combine, earlier_measures
    from benchmarks.report import accuracy_section

    tasks, contexts = ["passkey", "qa"], [1000, 4000]
    measured = {
        "full": {"flags": [], "contexts": {1000: _fake_measure(2, tasks, 4),
                                           4000: _fake_measure(2, tasks, 2)}},
        "snapkv@0.25": {"flags": ["--kv-policy", "snapkv", "--kv-budget", "0.25"],
                        "contexts": {1000: _fake_measure(2, tasks, 2),
                                     4000: _fake_measure(2, tasks, 1)}},
        "h2o@0.1": {"flags": [], "contexts": {1000: _fake_measure(2, tasks, 1)}},  # incomplete
    }
    configs = combine(measured, contexts, tasks)
    assert set(configs) == {"full", "snapkv@0.25"}
    snap = configs["snapkv@0.25"]
    assert (snap["correct"], snap["total"]) == (3, 8) and snap["relative"] == 0.5
    assert snap["per_context"]["4000"] == {"correct": 1, "total": 4,
                                           "per_task": {"passkey": 1, "qa": 0}, "relative": 0.5}
    assert {s["context_tokens"] for s in snap["per_sample"]} == {1000, 4000}
    result = {"context_tokens": contexts, "tasks": tasks, "budgets": [0.25],
              "samples_per_task": 2, "configs": configs}
    again = earlier_measures(json.loads(json.dumps(result)), tasks, 2, contexts)
    assert combine(again, contexts, tasks) == configs
    table = "\n".join(accuracy_section(result))
    assert "| snapkv | 3/8 = 3 + 0 (50%) |" in table


def test_an_interrupted_run_keeps_the_contexts_it_measured():
    from benchmarks.accuracy import combine, earlier_measures, incomplete

    tasks, contexts = ["passkey", "qa"], [1000, 4000]
    measured = {"full": {"flags": [], "contexts": {1000: _fake_measure(2, tasks, 4),
                                                   4000: _fake_measure(2, tasks, 2)}},
                "snapkv@0.25": {"flags": ["--kv-policy", "snapkv"],
                                "contexts": {1000: _fake_measure(2, tasks, 3)}}}
    saved = json.loads(json.dumps({
        "context_tokens": contexts, "tasks": tasks, "samples_per_task": 2,
        "configs": combine(measured, contexts, tasks),
        "incomplete": incomplete(measured, contexts)}))
    assert set(saved["configs"]) == {"full"} and set(saved["incomplete"]) == {"snapkv@0.25"}
    assert earlier_measures(saved, tasks, 2, contexts) == measured
    # A subset of the tasks, from the same samples.
    again = earlier_measures(saved, ["qa"], 2, contexts)
    assert again["snapkv@0.25"]["contexts"][1000]["per_task"] == {"qa": 1}


def test_budgets_are_fractions():
    import argparse

    from benchmarks.accuracy import budget

    assert [budget(b) for b in ("1.0", "0.5", "0.25", "0.1")] == [1.0, 0.5, 0.25, 0.1]
    for bad in ("0", "1.5", "512"):
        with pytest.raises(argparse.ArgumentTypeError):
            budget(bad)


def test_the_grid_report_shows_the_full_cache_per_task_and_the_targets():
    from benchmarks.accuracy import combine
    from benchmarks.report import accuracy_grid_section

    tasks, contexts = ["passkey", "qa"], [1000, 4000]

    def config(flags, *correct):
        return {"flags": flags, "contexts": {c: _fake_measure(2, tasks, n)
                                             for c, n in zip(contexts, correct)}}

    measured = {"full": config([], 4, 2), "snapkv@0.25": config([], 4, 2),
                "snapkv@0.1": config([], 3, 2), "h2o@0.25": config([], 2, 1)}
    result = {"command": "python -m benchmarks.accuracy --contexts 1000 4000",
              "context_tokens": contexts, "tasks": tasks, "budgets": [0.25, 0.1],
              "samples_per_task": 2, "configs": combine(measured, contexts, tasks)}
    table = "\n".join(accuracy_grid_section(result))
    assert "`python -m benchmarks.accuracy --contexts 1000 4000`" in table
    # _fake_measure marks the first samples correct: passkey's two, then qa's.
    assert "| passkey | 2 | 2 |" in table and "| qa | 2 | 0 |" in table
    assert "| snapkv | 6/8 (100%: 100 / 100) | 5/8 (83%: 75 / 100) |" in table
    assert "| h2o | 3/8 (50%: 50 / 50) |  |" in table
    assert ("at budget 0.25, >= 95% of the full cache: met by snapkv; missed by h2o (50%)"
            in table)
    assert "at budget 0.1, >= 85% of the full cache: met by none; missed by snapkv (83%)" in table


def test_runs_side_by_side_merge_into_one_file(tmp_path):
    from benchmarks.accuracy import combine, incomplete, main

    tasks, contexts = ["passkey", "qa"], [1000, 4000]

    def saved(path, command, budgets, measured, machine="m"):
        path.write_text(json.dumps({
            "command": command, "machine": machine, "context_tokens": contexts, "tasks": tasks,
            "budgets": budgets, "samples_per_task": 2,
            "configs": combine(measured, contexts, tasks),
            "incomplete": incomplete(measured, contexts)}))

    full = {"flags": [], "contexts": {1000: _fake_measure(2, tasks, 4),
                                      4000: _fake_measure(2, tasks, 2)}}
    h2o = {"flags": ["--kv-policy", "h2o"], "contexts": {1000: _fake_measure(2, tasks, 1),
                                                         4000: _fake_measure(2, tasks, 1)}}
    snap_1k = {"flags": ["--kv-policy", "snapkv"], "contexts": {1000: _fake_measure(2, tasks, 3)}}
    mine, other = tmp_path / "grid.json", tmp_path / "grid_b.json"
    saved(mine, "python -m benchmarks.accuracy --policies snapkv", [0.25],
          {"full": full, "snapkv@0.25": snap_1k})
    saved(other, "python -m benchmarks.accuracy --policies h2o --out grid_b.json", [0.1],
          {"full": full, "h2o@0.1": h2o}, machine="n")
    result = main(["--out", str(mine), "--merge", str(other)])
    assert result["machine"] == "m and n"
    assert set(result["configs"]) == {"full", "h2o@0.1"}
    assert result["configs"]["h2o@0.1"]["correct"] == 2 and result["configs"]["h2o@0.1"][
        "relative"] == 2 / 6
    assert set(result["incomplete"]) == {"snapkv@0.25"}  # still waits for its 4K prompts
    assert result["budgets"] == [0.25, 0.1]
    assert result["command"] == "python -m benchmarks.accuracy --policies snapkv"
    assert result["resumed_from"] == [
        "python -m benchmarks.accuracy --policies h2o --out grid_b.json"]
    assert result["merged_from"] == [str(other)]
    assert json.loads(mine.read_text())["configs"] == result["configs"]
    (tmp_path / "other_samples.json").write_text(json.dumps({**json.loads(other.read_text()),
                                                         "samples_per_task": 3}))
    with pytest.raises(SystemExit, match="not the tasks and samples per task"):
        main(["--out", str(mine), "--merge", str(tmp_path / "other_samples.json")])


def test_a_resumed_result_names_every_machine_its_rows_ran_on():
    from benchmarks.results import machines

    assert machines("A, 2 cores", None) == "A, 2 cores"
    assert machines("A, 2 cores", "A, 2 cores") == "A, 2 cores"
    both = machines("A, 2 cores", "B, 2 cores")
    assert both == "A, 2 cores and B, 2 cores"
    assert machines("B, 2 cores", both) == "B, 2 cores and A, 2 cores"  # resumed on one of them
    assert machines("C, 4 cores", both) == "C, 4 cores and A, 2 cores and B, 2 cores"
