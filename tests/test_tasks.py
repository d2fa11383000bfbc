"""The generated long-context tasks: deterministic, the answer hidden at the stated depth."""

from __future__ import annotations

import pytest

from benchmarks.tasks import TASKS


@pytest.mark.parametrize("task", sorted(TASKS))
def test_tasks_are_deterministic_and_hide_the_answer_at_its_depth(task):
    first, again = TASKS[task](None, 2000), TASKS[task](None, 2000)
    assert first == again
    depths = [s.depth for s in first]
    assert depths == sorted(depths)
    offsets = []
    for sample in first:
        assert sample.answer in sample.prompt
        offsets.append(sample.prompt.index(sample.answer) / len(sample.prompt))
    assert offsets == sorted(offsets)  # deeper needles sit later in the prompt
