"""Triton kernels on CPU: Triton's interpreter, switched on for this folder only.

A kernel picks GPU or interpreter when it is decorated, i.e. when
``vllm_kvcompress.kernels.triton`` is first imported; Triton also decorates
helpers of its own lazily, at the first launch. Nothing else in the suite
imports the kernels, and pytest loads this file before the test modules beside
it, so importing them here under ``TRITON_INTERPRET=1`` and keeping the variable
set while this folder's tests run is enough, and the servers that other tests
start do not inherit it.
"""

from __future__ import annotations

import os

import pytest
import torch

INTERPRET = not torch.cuda.is_available()
if INTERPRET:
    _before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import vllm_kvcompress.kernels.triton  # noqa: F401
    finally:
        if _before is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = _before


@pytest.fixture(autouse=True)
def _triton_interpreter(monkeypatch):
    if INTERPRET:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
