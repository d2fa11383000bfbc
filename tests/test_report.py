"""docs/results.md and README's generated blocks, rendered from results JSON and report.yaml."""

from __future__ import annotations

import re

import pytest

from benchmarks import report
from benchmarks.report import (KINDS, README, RESULTS, RESULTS_MD, fill, headline,
                               readme_blocks, render_results, section, section_spec, spec,
                               splice)
from benchmarks.throughput import arguments, plot


def sections() -> dict[str, dict]:
    return {s["file"]: section_spec(s["file"]) for g in spec()["groups"] for s in g["sections"]}


def test_modes_choose_online_offline_or_both():
    assert arguments([]).modes == ["online"]
    assert arguments(["--offline"]).modes == ["online", "offline"]
    assert arguments(["--modes", "offline"]).modes == ["offline"]
    args = arguments(["--modes", "offline", "--configs", "plain", "pyramidkv@0.25"])
    assert args.command == ("python -m benchmarks.throughput --modes offline "
                            "--configs plain pyramidkv@0.25")


# --- the spec and the committed output ---------------------------------------------------


def test_every_section_names_a_renderer_and_a_title():
    for name, s in sections().items():
        assert s["kind"] in KINDS, name
        data = report.load(name) or {}
        assert data.get("title") or s.get("title"), f"{name}: no title in the file or the YAML"


def test_the_committed_results_page_and_readme_blocks_are_up_to_date():
    """Regenerate with ``python -m benchmarks.report`` after changing results/ or report.yaml."""
    assert RESULTS_MD.read_text() == render_results(), "docs/results.md is stale"
    text = README.read_text()
    assert splice(text, readme_blocks()) == text, "README.md's generated blocks are stale"


def test_every_results_file_and_plot_is_shown():
    shown = RESULTS_MD.read_text()
    for png in RESULTS.glob("*.png"):
        assert f"](../results/{png.name})" in shown, f"{png.name} is shown nowhere"
    merged = {f for s in sections() for f in (report.load(s) or {}).get("merged_from", [])}
    rendered = set(sections()) | {"kvpress_split_none"}  # the kvpress table's second column
    for path in RESULTS.glob("*.json"):
        assert path.stem in rendered or f"results/{path.name}" in merged, path.name


def test_no_results_file_means_a_not_run_line_with_its_command():
    lines = section({"file": "nothing_here", "kind": "rows", "title": "Later",
                     "command": "python -m benchmarks.later"})
    assert lines == ["### Later", "", "Not run yet: `python -m benchmarks.later`."]


def test_templates_format_lists_sizes_scores_and_ranges():
    values = {"tasks": ["a", "b"], "kv": 8.07e8, "score": 6.25, "share": 0.951,
              "pair": [512, 512], "span": [1000, 2000], "ctx": 1000}
    assert fill("{tasks:and}; {tasks:plus}; {tasks:list}; {ctx:list}", values) == \
        "a and b; a + b; a, b; 1000"
    assert fill("{kv:MB} {score:n} {share:pct} {pair:range} {span:range}", values) == \
        "807 MB 6.25 95% 512 1000-2000"


def test_the_title_command_and_machine_come_from_the_results_file(monkeypatch):
    data = {"title": "Own title", "command": "python -m x --y", "device": "a GPU",
            "rows": [{"name": "r", "v": 1.5}]}
    s = {"file": "x", "kind": "rows", "title": "YAML title", "intro": "v is {note}",
         "columns": [{"header": "name", "cell": "{name}"}, {"header": "v", "cell": "{v:.1f}"}],
         "notes": ["Note: {note}", {"when": "never", "text": "left out"}]}
    text = "\n".join(section(s, {**data, "note": "a note"}))
    assert text.startswith("### Own title\n\n`python -m x --y` on a GPU (v is a note).")
    assert "| r | 1.5 |" in text and "Note: a note" in text and "left out" not in text


# --- renderers, on synthetic data ----------------------------------------------------------


def test_offline_table_compares_with_plain_and_the_ceiling():
    def row(tps):
        return {"offline": {"output_tokens_per_s": tps, "requests_per_s": tps / 100,
                            "elapsed_s": 600.0}}

    data = {"command": "python -m benchmarks.throughput --modes offline", "requests": 16,
            "prompt_tokens": [1000, 2000], "output_tokens": [512, 512],
            "kv_bytes": 8e8, "ample_kv_bytes": 4e9,
            "configs": {"plain-ample": row(20.0), "plain": row(10.0), "pyramidkv@0.25": row(19.0)}}
    table = "\n".join(section(sections()["throughput_offline"], data))
    assert "| pyramidkv@0.25 | 19.0 | 1.90x | 0.95x | 0.190 | 600 |" in table
    assert "`python -m benchmarks.throughput --modes offline`" in table
    assert "16 prompts of 1000-2000 tokens, outputs 512 tokens" in table


def test_a_concurrency_sweep_gets_a_table_per_level_against_plain(tmp_path):
    def online(tps):
        return {"output_tokens_per_s": tps, "requests_per_s": tps / 100, "peak_running": 4,
                "ttft_p50_s": 1.0, "ttft_p99_s": 2.0, "tpot_p50_s": 0.1, "tpot_p99_s": 0.2}

    def row(*tps):
        return {"online": {str(c): online(t) for c, t in zip((4, 8, 16), tps)}}

    data = {"command": "python -m benchmarks.throughput --concurrency 4 8 16", "requests": 16,
            "prompt_tokens": [1000, 4000], "output_tokens": [128, 512],
            "kv_bytes": 8e8, "ample_kv_bytes": 4e9,
            "configs": {"plain-ample": row(12.0, 20.0, 30.0), "plain": row(10.0, 12.0, 12.0),
                        "pyramidkv@0.25": row(11.0, 18.0, 24.0)}}
    s = sections()["throughput"]
    table = "\n".join(section(s, data))
    assert "| pyramidkv@0.25 | 24.0 | 2.00x | 0.80x |" in table  # the main table: 16 clients
    assert "16 streaming clients; a KV space of 800 MB" in table
    assert "plain vLLM is 2.50x faster than in the tight space" in table  # the ceiling note
    assert "| 4 clients | 8 clients | 16 clients |" in table
    assert "| plain | 10.0 | 12.0 | 12.0 |" in table
    assert "| pyramidkv@0.25 | 11.0 (1.10x) | 18.0 (1.50x) | 24.0 (2.00x) |" in table
    plot(data, tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").stat().st_size > 0
    one_level = {**data, "configs": {n: {"online": {"16": r["online"]["16"]}}
                                     for n, r in data["configs"].items() if n != "plain-ample"}}
    alone = "\n".join(section(s, one_level))
    assert "clients |" not in alone and "The ceiling" not in alone


def test_fidelity_table_clamps_float_noise_and_names_a_config_that_cannot_run():
    data = {"command": "python -m benchmarks.fidelity --configs plain snapkv@0.25", "prompts": 4,
            "context_tokens": 2000, "tokens": 256, "kv_bytes": 1e9,
            "configs": {"plain": {"kv_tokens": 100, "agreement": 1.0, "kl": -1e-9,
                                  "prefix_tokens": 256},
                        "snapkv@0.25": {"kv_tokens": 100, "agreement": 0.9, "kl": 0.25,
                                        "prefix_tokens": 12.5},
                        "vllm-fp8": {"error": "no fp8 here"}}}
    table = "\n".join(section(sections()["fidelity_policies"], data))
    assert table.startswith("### The eviction policies")
    assert "| plain | 100 | 100.0% | 0.0000 | 256 |" in table
    assert "| snapkv@0.25 | 100 | 90.0% | 0.2500 | 12 |" in table
    assert "| vllm-fp8 | cannot run on this machine: no fp8 here |" in table


def _grid(relative_full: float = 6.5) -> dict:
    def config(correct):
        tasks = {"passkey": 4, "multivalue": correct - 4}
        per = {"1000": {"correct": correct, "total": 8, "per_task": tasks,
                        "relative": correct / relative_full}}
        return {"flags": [], "correct": correct, "total": 8, "relative": correct / relative_full,
                "per_task": tasks, "per_context": per}

    return {"command": "python -m benchmarks.accuracy --contexts 1000", "context_tokens": 1000,
            "tasks": ["passkey", "multivalue"], "samples_per_task": 4,
            "resumed_from": ["python -m benchmarks.accuracy --budgets 0.1"],
            "configs": {"full": config(6.5), "pyramidkv@0.25": config(6.25),
                        "pyramidkv@0.1": config(5.0)}}


def test_accuracy_grid_shows_partial_credit_shares_and_the_yamls_targets():
    table = "\n".join(section(sections()["accuracy_grid"], _grid()))
    assert table.startswith("### Seven tasks over lengths and budgets\n\n2 runs of")
    # The commands follow the table, the file's earlier ones first.
    assert table.endswith("- `python -m benchmarks.accuracy --budgets 0.1`\n"
                          "- `python -m benchmarks.accuracy --contexts 1000`\n\n</details>")
    assert "| multivalue | 2.5 |" in table
    assert "| pyramidkv | 6.25/8 (96%) | 5/8 (77%) |" in table
    assert ("Targets: at budget 0.25, >= 95% of the full cache: met by pyramidkv; at budget 0.1, "
            ">= 85% of the full cache: met by none; missed by pyramidkv (77%).") in table
    # Other grid-shaped files render the same way under their own title, without targets.
    one_length = "\n".join(section(sections()["accuracy_1k"], _grid()))
    assert one_length.startswith("### Seven tasks at ~1000 tokens, with more prompts")
    assert "| pyramidkv | 6.25/8 (96%) | 5/8 (77%) |" in one_length
    assert "Targets" not in one_length


def test_an_unfinished_accuracy_grid_says_what_it_has():
    data = {"command": "python -m benchmarks.accuracy --contexts 1000 2000",
            "context_tokens": [1000, 2000], "tasks": ["passkey"], "samples_per_task": 4,
            "configs": {}, "incomplete": {"full": {"flags": [], "contexts": {}}}}
    assert "not finished; measured so far: full." in "\n".join(
        section(sections()["accuracy_grid"], data))


def _ms(x):
    return {"ms": x, "bytes": 1, "gbps": 10 / x}


def test_kernel_table_sums_up_against_the_yamls_baseline():
    data = {"command": "python -m benchmarks.kernels --batches 1", "device": "cpu", "threads": 2,
            "dtype": "float32", "kv_heads": 3, "group": 3, "head_dim": 64, "page_size": 16,
            "rows": [{"context": 1024, "batch": 1, "vllm-cpu": _ms(0.1), "cpu-paged-k8v4": _ms(0.2)},
                     {"context": 4096, "batch": 1, "vllm-cpu": _ms(0.4), "cpu-paged-k8v4": _ms(0.2)}]}
    table = "\n".join(section(sections()["kernels"], data))
    assert "`python -m benchmarks.kernels --batches 1` on cpu" in table
    assert "| 4096 | 1 | 0.40 | 0.20 |" in table
    assert "k8v4 0.50-2.00x (no slower at 1 of 2 shapes)" in table


def test_gpu_kernel_table_uses_its_own_cell_and_baseline():
    data = {"title": "Triton on a GPU", "command": "python3 -m benchmarks.kernels", "device": "H",
            "dtype": "bfloat16", "kv_heads": 8, "group": 4, "head_dim": 128, "page_size": 16,
            "peak_gbps": 4800, "note": "cut short.",
            "rows": [{"context": 1024, "batch": 8, "sdpa": _ms(0.05), "triton-none": _ms(0.1)}]}
    table = "\n".join(section(sections()["kernels_h200"], data))
    assert table.startswith("### Triton on a GPU")
    assert "| 1024 | 8 | 0.050 / 200 | 0.100 / 100 |" in table
    assert "none 2.00-2.00x (no slower at 0 of 1 shapes)" in table
    assert "The run: cut short." in table


def test_test_counts_table_totals_each_outcome():
    data = {"title": "Kernel tests", "command": "pytest tests/kernels", "device": "H",
            "commit": "abc", "tests": {"t::a": {"passed": 3}, "t::b": {"passed": 1, "failed": 2},
                                       "t::c": {"skipped": 4}}}
    table = "\n".join(section(sections()["gpu_kernel_tests"], data))
    assert "| `t::b` | 1 | 2 |  |" in table
    assert "| all | **4** | **2** | **4** |" in table
    assert "Code: abc." in table


def test_contract_summary_counts_every_other_status_as_failed():
    def entry(name, **statuses):
        return {"entry": name, "results": {v: {"status": s, "detail": f"{s} detail"}
                                           for v, s in statuses.items()}}

    data = {"title": "Contract", "command": "python -m vllm_kvcompress.contract",
            "date": "2026-01-01", "vllm_versions": ["0.32.0", "0.34.0"],
            "summary": {"0.32.0": {"ok": 3}, "0.34.0": {"ok": 1, "runner-removed": 1,
                                                       "missing": 1}},
            "entries": [entry("a.B.c", **{"0.32.0": "ok", "0.34.0": "ok"}),
                        entry("a.V1.x", **{"0.32.0": "ok", "0.34.0": "runner-removed"}),
                        entry("a.C.gone", **{"0.32.0": "ok", "0.34.0": "missing"})]}
    table = "\n".join(section(sections()["contract"], data))
    assert "| 0.32.0 | 3 | 0 | 0 |" in table and "| 0.34.0 | 1 | 1 | 1 |" in table
    assert "- 0.34.0: `a.C.gone`: missing (missing detail)" in table
    assert "a.V1.x" not in table


def test_lab_table_gives_each_configuration_its_kept_share_and_score(monkeypatch):
    def row(correct, kept, relative, per_context, per_task):
        return {"correct": correct, "kept": kept, "relative": relative, "per_sample": [{}] * 4,
                "per_context": per_context, "per_task": per_task}

    data = {"command": "python -m benchmarks.lab --configs leankv@0.25", "held_out": False,
            "context_tokens": [1000, 2000], "tasks": ["passkey", "vartrack"], "samples_per_task": 1,
            "configs": {"full": row(3.5, 1.0, 1.0, {"1000": 2, "2000": 1.5},
                                    {"passkey": 2, "vartrack": 1.5}),
                        "leankv@0.25": row(2.0, 0.1412, 2 / 3.5, {"1000": 1, "2000": 1},
                                           {"passkey": 2, "vartrack": 0})}}
    s = sections()["lab"]
    monkeypatch.setattr(report, "load", lambda name: None)
    table = "\n".join(section(s, data))
    assert "| full cache | 1.000 | 3.5/4 | 100% | 2 / 1.5 | 2 / 1.5 |" in table
    assert "| `leankv@0.25` | 0.141 | 2/4 | 57% | 1 / 1 | 2 / 0 |" in table
    assert "*vLLM grid*" not in table

    # Beside the grid's score on the same prompts, where the grid has the configuration.
    grid = {"samples_per_task": 1, "configs": {"leankv@0.25": {"per_sample": [
        {"task": "passkey", "context_tokens": 1000, "correct": 1},
        {"task": "passkey", "context_tokens": 2000, "correct": 1},
        {"task": "vartrack", "context_tokens": 1000, "correct": 0.5},
        {"task": "vartrack", "context_tokens": 2000, "correct": 0},
        {"task": "qa", "context_tokens": 1000, "correct": 1},
        {"task": "passkey", "context_tokens": 4000, "correct": 1}]}}}
    monkeypatch.setattr(report, "load", lambda name: grid if name == s["compare_with"] else None)
    table = "\n".join(section(s, data))
    assert "| `leankv@0.25` | 0.141 | 2/4 | 57% | 1 / 1 | 2 / 0 | 2.5 |" in table
    assert "| full cache | 1.000 | 3.5/4 | 100% | 2 / 1.5 | 2 / 1.5 |  |" in table
    assert "*vLLM grid*" in table


def test_kvpress_table_keeps_the_benchmark_order_and_names_a_failing_press(monkeypatch):
    def row(correct):
        return {"correct": correct, "per_task": {"passkey": correct}, "error": None}

    data = {"kvpress_version": "0.5.5", "transformers_version": "5.2.0", "samples_per_task": 2,
            "tasks": ["passkey"],
            "configs": {"full": row(2), "snapkv@0.25": row(1), "streamingllm@0.25": row(0),
                        "pyramidkv@0.25": {**row(0), "errors": 2,
                                           "error": "RuntimeError: sizes differ; RuntimeError: x"}}}
    monkeypatch.setattr(report, "load", lambda name: None)
    lines = section(sections()["kvpress"], data)
    methods = [line.split(" | ")[0] for line in lines if line.startswith("| ") and "@" not in line]
    assert methods[2:] == ["| full", "| snapkv", "| pyramidkv", "| streamingllm"]
    assert ("| pyramidkv | 0.25 | fails on 2 of 2 prompts (RuntimeError, below) | not run | "
            "not run |") in lines
    assert lines[-1] == ("kvpress's errors, the first of each configuration: pyramidkv@0.25: "
                         "`RuntimeError: sizes differ`.")


# --- README ------------------------------------------------------------------------------


def test_headline_takes_each_cell_from_its_column_file(monkeypatch):
    def online(tps):
        return {"online": {"4": {"output_tokens_per_s": 1.0}, "16": {"output_tokens_per_s": tps}}}

    files = {"tp": {"configs": {"plain": online(10.0), "snapkv@0.25": online(15.0)}},
             "acc": {"configs": {"full": {"relative": 1.0}, "snapkv@0.25": {"relative": 0.934}}},
             "fid": {"configs": {"plain": {"agreement": 1.0}}},
             "fid2": {"configs": {"snapkv@0.25": {"agreement": 0.917}}}}
    monkeypatch.setattr(report, "load", files.get)
    block = {"caption": "Cap.", "columns": [
        {"header": "tok/s", "file": "tp", "metric": "online"},
        {"header": "accuracy", "file": "acc", "metric": "share"},
        {"header": "agreement", "file": ["fid", "fid2"], "metric": "agreement"},
        {"header": "not run", "file": "absent", "metric": "share"}],
        "rows": [{"label": "plain", "config": "plain", "as": {"acc": "full"}},
                 {"label": "snap", "config": "snapkv@0.25"}]}
    lines = headline(block)
    assert lines[0] == "Cap."
    assert "| plain | 10.0 (1.00x) | 100% | 100.0% |  |" in lines
    assert "| snap | 15.0 (1.50x) | 93% | 91.7% |  |" in lines


def test_splice_replaces_only_the_named_blocks_and_refuses_a_missing_one():
    text = "top\n<!-- a:begin -->\nold\n<!-- a:end -->\nbottom\n"
    assert splice(text, {"a": "new"}) == "top\n<!-- a:begin -->\nnew\n<!-- a:end -->\nbottom\n"
    with pytest.raises(ValueError, match="b:begin"):
        splice(text, {"b": "x"})


def test_readme_keeps_its_two_commands_and_stays_short():
    text = README.read_text()
    ci = (README.parent / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert f"\n{ci}\n" in text  # .ci/run runs README's test command verbatim
    assert len(text.splitlines()) <= 260
    links = re.findall(r"\]\(((?:docs|configs)/[^)#]*)", text)
    assert links and all((README.parent / link).exists() for link in links), links
