"""Where benchmarks leave their numbers: results/NAME.json (and NAME.png), read by report.py."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path


def save(result: dict, out: Path, plot: Callable[[dict, Path], None] | None = None) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    if plot is not None:
        plot(result, out.with_suffix(".png"))
