"""Shared fixtures: the default model, built once per machine and cached."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def default_model() -> str:
    from vllm_kvcompress.models import default_model_path

    return str(default_model_path())
