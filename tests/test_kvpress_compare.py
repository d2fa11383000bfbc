"""The kvpress comparison's pure parts: the prompt split, the press recipes, the scoring."""

from __future__ import annotations

import pytest

from benchmarks.kvpress_compare import (
    PRESSES,
    budget_of,
    press_spec,
    side_by_side,
    split_prompt,
    summarize,
)
from benchmarks.tasks import TASKS

PREFIX = "<|im_start|>user\n"
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("task", sorted(TASKS))
def test_split_puts_the_question_after_the_haystack_and_loses_nothing(task):
    for sample in TASKS[task](None, 2000):
        prompt = PREFIX + sample.prompt + SUFFIX  # tokenizer None: the bare user text
        context, question = split_prompt(prompt, PREFIX, SUFFIX)
        assert PREFIX + context + question + SUFFIX == prompt
        if task in ("passkey", "multikey"):
            assert question.lstrip().startswith("What is the pass key")
        assert question.lstrip(" ").startswith("\n\n")  # the whitespace goes with the question
        assert not context[-1].isspace()
        assert all(a in context and a not in question for a in sample.answers)


def test_split_rejects_a_prompt_in_another_format():
    with pytest.raises(ValueError):
        split_prompt("no chat here\n\nquestion", PREFIX, SUFFIX)
    with pytest.raises(ValueError):
        split_prompt(PREFIX + "one paragraph" + SUFFIX, PREFIX, SUFFIX)


def test_press_specs_put_the_ratio_on_the_scorer_and_leave_the_table_alone():
    ada = press_spec("adakv", 0.9)
    assert ada["class"] == "AdaKVPress" and "compression_ratio" not in ada["kwargs"]
    assert ada["inner"]["kwargs"] == {"window_size": 32, "kernel_size": 15,
                                      "compression_ratio": 0.9}
    assert press_spec("chunkkv", 0.75)["inner"]["kwargs"]["compression_ratio"] == 0.75
    assert press_spec("snapkv", 0.75)["kwargs"]["compression_ratio"] == 0.75
    assert all("compression_ratio" not in str(spec) for spec in PRESSES.values())
    assert budget_of(0.9) == 0.1 and budget_of(0.75) == 0.25


def test_summarize_counts_errors_as_wrong_and_splits_by_task():
    samples = TASKS["passkey"](None, 2000, depths=(0.25, 0.75)) + TASKS["multikey"](
        None, 2000, depths=(0.5,))
    entry = {"per_sample": [
        {"output": f"It is {samples[0].answer}.", "error": None, "kept_tokens": 50.0,
         "context_tokens": 200},
        {"output": None, "error": "RuntimeError: shape", "kept_tokens": None,
         "context_tokens": 200},
        {"output": samples[2].answer, "error": None, "kept_tokens": 25.0, "context_tokens": 100},
    ]}
    summarize(entry, samples)
    assert (entry["correct"], entry["total"], entry["errors"]) == (2, 3, 1)
    assert entry["per_task"] == {"passkey": 1, "multikey": 1}
    assert entry["kept_fraction"] == 0.25
    lines = side_by_side({}, {"snapkv@0.25": {**entry, "error": "RuntimeError: shape"}})
    assert "2/3" in lines[1] and "RuntimeError: shape" in lines[1]


def test_split_none_compresses_the_question_too():
    sample = TASKS["passkey"](None, 2000)[0]
    prompt = PREFIX + sample.prompt + SUFFIX
    context, question = split_prompt(prompt, PREFIX, SUFFIX, "none")
    assert question == "" and PREFIX + context + SUFFIX == prompt
    with pytest.raises(ValueError):
        split_prompt(prompt, PREFIX, SUFFIX, "sideways")
