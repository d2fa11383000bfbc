"""The ``vllm`` command: flags listed, bad values rejected before anything loads."""

from __future__ import annotations

import shutil
import subprocess

import pytest

pytest.importorskip("vllm")


def vllm(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    exe = shutil.which("vllm")
    assert exe, "the vllm command is missing: pip install -e . provides it"
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=timeout)


def test_help_lists_the_flag_group():
    out = vllm("serve", "--help=kvcompress")
    assert out.returncode == 0, out.stderr
    for flag in ("--kv-policy", "--kv-budget", "--kv-window", "--kv-config"):
        assert flag in out.stdout


def test_unknown_policy_exits_2_naming_the_choices(default_model):
    out = vllm("serve", default_model, "--kv-policy", "bogus")
    assert out.returncode == 2
    assert "--kv-policy" in out.stderr and "pyramidkv" in out.stderr and "snapkv" in out.stderr


def test_out_of_range_budget_exits_2_naming_allowed_values(default_model):
    out = vllm("serve", default_model, "--kv-budget", "3")
    assert out.returncode == 2
    assert "--kv-budget" in out.stderr and "(0, 1]" in out.stderr and ">= 16" in out.stderr


def test_malformed_preset_exits_2_with_file_and_line(default_model, tmp_path):
    preset = tmp_path / "broken.yaml"
    preset.write_text("policy: snapkv\nbudget: 0.25\nwindow: -3\n")
    out = vllm("serve", default_model, "--kv-config", str(preset))
    assert out.returncode == 2
    assert f"{preset}:3" in out.stderr and "window" in out.stderr
