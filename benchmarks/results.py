"""Where benchmarks leave their numbers: results/NAME.json (and NAME.png), read by report.py."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path


def machine() -> str:
    """The CPU's model name and core count, as the tables name the machine they ran on."""
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        name = "cpu"
    return f"{name}, {os.cpu_count()} cores"


def machines(*named: str | None) -> str:
    """Every machine that results from several runs ran on, each named once, in order.

    Each argument is a result's ``machine`` (itself possibly such a list). Which
    rows ran where is not kept, so the name claims no more than the set.
    """
    names: list[str] = []
    for name in (part for one in named if one for part in one.split(" and ")):
        if name not in names:
            names.append(name)
    return " and ".join(names)


def save(result: dict, out: Path, plot: Callable[[dict, Path], None] | None = None) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    if plot is not None:
        plot(result, out.with_suffix(".png"))
