"""The contract check (vllm_kvcompress/contract.py): vLLM internals the adapters rely on."""

from __future__ import annotations

import json
import textwrap
import zipfile
from pathlib import Path

import pytest

from vllm_kvcompress import contract
from vllm_kvcompress.vllm.surface import SURFACE, V1_RUNNER, Touch

# Failures the wheel check knows about, by version; each is reported, not fixed here.
KNOWN_FAILURES = {
    # 0.34 removed the V1 runner and with it the switch between runners (V2 is the only
    # one; VLLM_USE_V2_MODEL_RUNNER=0 is rejected). Only the doctor reads it.
    "0.34.0": {"vllm.config.vllm.VllmConfig.use_v2_model_runner"},
}


def _statuses(results: list[contract.Result]) -> dict[str, str]:
    return {r.entry.qualname: r.status for r in results}


@pytest.fixture(scope="module")
def installed() -> list[contract.Result]:
    return contract.check_installed()


def test_installed_vllm_has_every_entry(installed):
    assert [(r.entry.qualname, r.status, r.detail) for r in installed if r.status != "ok"] == []


# Entries against the installed vLLM, with the status each must get.
PROBES = [
    (Touch("vllm.v1.core.block_pool", "BlockPool.free_blocks", "method", ("ordered_blocks",)),
     "ok"),
    (Touch("vllm.v1.core.block_pool", "BlockPool.free_blocks", "method", ("gone",)), "params"),
    (Touch("vllm.config.model", "ModelConfig.get_num_kv_heads", "method",
           ("arch_config", "parallel_config")), "params"),  # reordered
    (Touch("vllm.v1.core.block_pool", "BlockPool.no_such_field", "field"), "missing"),
    (Touch("vllm.v1.core.block_pool", "BlockPool.null_block", "field"), "ok"),  # in __init__
    (Touch("vllm.v1.core.block_pool", "BlockPool", "method"), "kind"),
    (Touch("vllm.v1.no_such_module", "X", "class"), "missing-module"),
    (Touch("vllm.v1.core.block_pool", "NoSuchClass.x", "field"), "missing"),
]


def test_installed_checker_detects_breakage():
    assert [r.status for r in contract.check_installed([t for t, _ in PROBES])] == [
        status for _, status in PROBES]


def test_ast_checker_agrees_with_installed_checker(installed):
    import vllm

    site = Path(vllm.__file__).parent.parent  # the installed package's own sources
    probes = [t for t, _ in PROBES]
    assert _statuses(contract.check_sources(site)) == _statuses(installed)
    assert [r.status for r in contract.check_sources(site, probes)] == [
        r.status for r in contract.check_installed(probes)]


# A small vLLM in which the adapters' needs are met, then broken one at a time.
TREE = {
    "vllm/__init__.py": "",
    "vllm/base.py": """
        from dataclasses import dataclass

        @dataclass
        class Spec:
            block_size: int
            dtype: str = "auto"

        class Runner:
            def __init__(self):
                self.kv_caches, (self.device, *self.rest) = [], (0, 1)

            def prepare(self, scheduler_output, batch, /, extra=None, *, flag=False):
                pass

            def open(self, *args, **kwargs):
                pass
        """,
    "vllm/v1/__init__.py": "",
    "vllm/v1/worker/__init__.py": "from ...base import Runner as BaseRunner\n",
    "vllm/v1/worker/runner.py": """
        from enum import Enum
        from . import BaseRunner
        from vllm.base import Spec

        class Backend(Enum):
            CPU = "cpu"

        class FullSpec(Spec):
            sliding_window: int | None = None

        class GPUModelRunner(BaseRunner):
            @property
            def attn_groups(self):
                return []

        if True:
            def helper(layer_name, num=1):
                pass
        """,
    "vllm/v1/worker/gpu_model_runner.py": "class GPUModelRunner:\n    def step(self, a): pass\n",
}
TOY = "vllm.v1.worker.runner"
TOY_SURFACE = [
    Touch(TOY, "GPUModelRunner.prepare", "method", ("scheduler_output", "batch", "flag")),
    Touch(TOY, "GPUModelRunner.open", "method", ("anything",)),  # **kwargs
    Touch(TOY, "GPUModelRunner.kv_caches", "field"),
    Touch(TOY, "GPUModelRunner.rest", "field"),  # starred in a tuple target
    Touch(TOY, "GPUModelRunner.attn_groups", "field"),  # a property
    Touch(TOY, "FullSpec.block_size", "field"),  # declared on the parent dataclass
    Touch(TOY, "FullSpec.sliding_window", "field"),
    Touch(TOY, "Backend.CPU", "field"),  # enum member
    Touch(TOY, "Spec", "class"),  # re-exported
    Touch(TOY, "helper", "function", ("layer_name",)),
    Touch(V1_RUNNER, "GPUModelRunner.step", "method", ("a",), runner="v1"),
    Touch("vllm.base", "Runner.kv_caches", "field", runner="v1"),
]


def _tree(tmp_path: Path, edits: dict[str, str | None] | None = None) -> Path:
    files = {**TREE, **(edits or {})}
    for name, text in files.items():
        if text is not None:
            path = tmp_path / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(textwrap.dedent(text))
    return tmp_path


def test_sources_checker_resolves_reexports_bases_and_assignments(tmp_path):
    results = contract.check_sources(_tree(tmp_path), TOY_SURFACE)
    assert [(r.entry.name, r.status, r.detail) for r in results if r.status != "ok"] == []


def test_sources_checker_reads_a_wheel_like_a_tree(tmp_path):
    wheel = tmp_path / "vllm-9.9.9-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for name, text in TREE.items():
            zf.writestr(name, textwrap.dedent(text))
        zf.writestr("vllm-9.9.9.dist-info/METADATA", "Name: vllm\n")
    tree = _tree(tmp_path / "tree")
    assert _statuses(contract.check_sources(wheel, TOY_SURFACE)) == _statuses(
        contract.check_sources(tree, TOY_SURFACE))


@pytest.mark.parametrize(("edit", "entry", "status"), [
    # a method lost a parameter
    ({"vllm/base.py": TREE["vllm/base.py"].replace("batch, /,", "/,")},
     "GPUModelRunner.prepare", "params"),
    # its parameters were reordered
    ({"vllm/base.py": TREE["vllm/base.py"].replace("scheduler_output, batch", "batch, "
                                                   "scheduler_output")},
     "GPUModelRunner.prepare", "params"),
    # a field is gone (the parent dataclass no longer declares it)
    ({"vllm/base.py": TREE["vllm/base.py"].replace("block_size: int", "page_size: int")},
     "FullSpec.block_size", "missing"),
    # an instance attribute is no longer assigned
    ({"vllm/base.py": TREE["vllm/base.py"].replace("self.kv_caches, ", "self.caches, ")},
     "GPUModelRunner.kv_caches", "missing"),
    # a module is gone
    ({"vllm/v1/worker/runner.py": None}, "GPUModelRunner.prepare", "missing-module"),
])
def test_sources_checker_detects_breakage(tmp_path, edit, entry, status):
    results = {r.entry.name: r for r in contract.check_sources(_tree(tmp_path, edit), TOY_SURFACE)}
    assert results[entry].status == status
    assert results[entry].failed


def test_v1_entries_are_runner_removed_without_the_v1_runner(tmp_path):
    tree = _tree(tmp_path, {"vllm/v1/worker/gpu_model_runner.py": None})
    results = {r.entry.name: r for r in contract.check_sources(tree, TOY_SURFACE)}
    assert results["GPUModelRunner.step"].status == "runner-removed"
    assert results["Runner.kv_caches"].status == "runner-removed"  # present, but V1's alone
    assert not any(r.failed for r in results.values())


def test_main_writes_a_table_and_results_file_and_fails_on_breakage(tmp_path, capsys):
    wheel = tmp_path / "vllm-9.9.9-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("vllm/__init__.py", "")
    out = tmp_path / "contract.json"
    assert contract.main(["--wheel", str(wheel), "--json", str(out)]) == 1
    printed = capsys.readouterr().out
    assert "9.9.9" in printed.splitlines()[0] and "missing-module" in printed
    data = json.loads(out.read_text())
    assert data["vllm_versions"] == ["9.9.9"] and data["command"].endswith(f"--json {out}")
    assert len(data["entries"]) == len(SURFACE)
    assert {e["results"]["9.9.9"]["status"] for e in data["entries"]} == {
        "missing-module", "runner-removed"}


@pytest.mark.slow
@pytest.mark.parametrize("version", ["0.32.0", "0.33.0", "0.34.0"])
def test_vllm_release_wheels(version):
    """Downloads each release's wheel once (~300 MB) into ~/.cache/vllm-kvcompress/wheels."""
    results = contract.check_sources(contract.fetch_wheel(version))
    failed = {r.entry.qualname for r in results if r.failed}
    assert failed == KNOWN_FAILURES.get(version, set())
