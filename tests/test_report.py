"""The README's results tables, rendered from results JSON (synthetic here)."""

from __future__ import annotations

from benchmarks.report import (SECTIONS, accuracy_grid_section, fidelity_section,
                               kernels_section, offline_throughput_section, render,
                               throughput_section)
from benchmarks.throughput import arguments, plot


def test_modes_choose_online_offline_or_both():
    assert arguments([]).modes == ["online"]
    assert arguments(["--offline"]).modes == ["online", "offline"]
    assert arguments(["--modes", "offline"]).modes == ["offline"]
    args = arguments(["--modes", "offline", "--configs", "plain", "pyramidkv@0.25"])
    assert args.command == ("python -m benchmarks.throughput --modes offline "
                            "--configs plain pyramidkv@0.25")


def test_offline_table_compares_with_plain_and_the_ceiling():
    def row(tps):
        return {"offline": {"output_tokens_per_s": tps, "requests_per_s": tps / 100,
                            "elapsed_s": 600.0}}

    data = {"command": "python -m benchmarks.throughput --modes offline", "requests": 16,
            "prompt_tokens": [1000, 2000], "output_tokens": [512, 512],
            "kv_bytes": 8e8, "ample_kv_bytes": 4e9,
            "configs": {"plain-ample": row(20.0), "plain": row(10.0), "pyramidkv@0.25": row(19.0)}}
    table = "\n".join(offline_throughput_section(data))
    assert "| pyramidkv@0.25 | 19.0 | 1.90x | 0.95x | 0.190 | 600 |" in table
    assert "`python -m benchmarks.throughput --modes offline`" in table


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
    table = "\n".join(throughput_section(data))
    assert "| pyramidkv@0.25 | 24.0 | 2.00x | 0.80x |" in table  # the main table: 16 clients
    assert "| 4 clients | 8 clients | 16 clients |" in table
    assert "| plain | 10.0 | 12.0 | 12.0 |" in table
    assert "| pyramidkv@0.25 | 11.0 (1.10x) | 18.0 (1.50x) | 24.0 (2.00x) |" in table
    plot(data, tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").stat().st_size > 0
    one_level = {**data, "configs": {n: {"online": {"16": r["online"]["16"]}}
                                     for n, r in data["configs"].items()}}
    assert "clients |" not in "\n".join(throughput_section(one_level))


def test_fidelity_tables_name_their_command_and_image():
    data = {"command": "python -m benchmarks.fidelity --configs plain snapkv@0.25", "prompts": 4,
            "context_tokens": 2000, "tokens": 256, "kv_bytes": 1e9,
            "configs": {"plain": {"kv_tokens": 100, "agreement": 1.0, "kl": -1e-9,
                                  "prefix_tokens": 256},
                        "snapkv@0.25": {"kv_tokens": 100, "agreement": 0.9, "kl": 0.25,
                                        "prefix_tokens": 12.5}}}
    table = "\n".join(fidelity_section(data, "fidelity_policies", "Policies"))
    assert table.startswith("### Policies")
    assert "| plain | 100 | 100.0% | 0.0000 | 256 |" in table
    assert "| snapkv@0.25 | 100 | 90.0% | 0.2500 | 12 |" in table
    assert "![fidelity_policies](results/fidelity_policies.png)" in table


def test_the_published_results_render():
    text = render()
    assert "### Throughput under memory pressure" in text and "### Fidelity" in text


def test_accuracy_grid_shows_partial_credit_shares_and_the_targets():
    def config(correct, full_correct):
        tasks = {"passkey": 4, "multivalue": correct - 4}
        per = {"1000": {"correct": correct, "total": 8, "per_task": tasks,
                        "relative": correct / full_correct}}
        return {"flags": [], "correct": correct, "total": 8, "relative": correct / full_correct,
                "per_task": per["1000"]["per_task"], "per_context": per}

    data = {"command": "python -m benchmarks.accuracy --contexts 1000", "context_tokens": 1000,
            "tasks": ["passkey", "multivalue"], "samples_per_task": 4,
            "resumed_from": ["python -m benchmarks.accuracy --budgets 0.1"],
            "configs": {"full": config(6.5, 6.5), "pyramidkv@0.25": config(6.25, 6.5),
                        "pyramidkv@0.1": config(5.0, 6.5)}}
    table = "\n".join(accuracy_grid_section(data))
    assert table.startswith("### Long-context accuracy over lengths and budgets\n\n2 runs of")
    # The commands follow the table, the file's earlier ones first.
    assert table.endswith("- `python -m benchmarks.accuracy --budgets 0.1`\n"
                          "- `python -m benchmarks.accuracy --contexts 1000`\n\n</details>")
    assert "| multivalue | 2.5 |" in table
    assert "| pyramidkv | 6.25/8 (96%) | 5/8 (77%) |" in table
    assert "met by pyramidkv" in table and "missed by pyramidkv (77%)" in table
    # Other grid-shaped files render the same way under their own title and plot.
    one_length = "\n".join(SECTIONS["accuracy_1k"](data))
    assert one_length.startswith("### Long-context accuracy at ~1000 tokens, with more prompts")
    assert "![accuracy_1k](results/accuracy_1k.png)" in one_length
    assert "| pyramidkv | 6.25/8 (96%) | 5/8 (77%) |" in one_length


def test_an_unfinished_accuracy_grid_says_what_it_has():
    data = {"command": "python -m benchmarks.accuracy --contexts 1000 2000",
            "context_tokens": [1000, 2000],
            "tasks": ["passkey"], "samples_per_task": 4, "configs": {},
            "incomplete": {"full": {"flags": [], "contexts": {}}}}
    assert "not finished; measured so far: full." in "\n".join(accuracy_grid_section(data))


def test_kernel_table_sums_up_against_vllms_op():
    def ms(x):
        return {"ms": x, "bytes": 1, "gbps": 1.0}

    data = {"command": "python -m benchmarks.kernels --batches 1", "device": "cpu", "threads": 2,
            "dtype": "float32", "kv_heads": 3, "group": 3, "head_dim": 64, "page_size": 16,
            "rows": [{"context": 1024, "batch": 1, "vllm-cpu": ms(0.1), "cpu-paged-k8v4": ms(0.2)},
                     {"context": 4096, "batch": 1, "vllm-cpu": ms(0.4), "cpu-paged-k8v4": ms(0.2)}]}
    table = "\n".join(kernels_section(data))
    assert table.startswith("### Decode step of one layer")
    assert "`python -m benchmarks.kernels --batches 1` on cpu" in table
    assert "| 4096 | 1 | 0.40 | 0.20 |" in table
    assert "k8v4 0.50-2.00x (no slower at 1 of 2 shapes)" in table


def test_lab_table_gives_each_configuration_its_kept_share_and_score(monkeypatch):
    from benchmarks import report
    from benchmarks.report import lab_section

    def row(correct, kept, relative, per_context, per_task):
        return {"correct": correct, "kept": kept, "relative": relative, "per_sample": [{}] * 4,
                "per_context": per_context, "per_task": per_task}

    data = {"command": "python -m benchmarks.lab --configs leankv@0.25", "held_out": False,
            "context_tokens": [1000, 2000], "tasks": ["passkey", "vartrack"], "samples_per_task": 1,
            "configs": {"full": row(3.5, 1.0, 1.0, {"1000": 2, "2000": 1.5},
                                    {"passkey": 2, "vartrack": 1.5}),
                        "leankv@0.25": row(2.0, 0.1412, 2 / 3.5, {"1000": 1, "2000": 1},
                                           {"passkey": 2, "vartrack": 0})}}
    table = "\n".join(lab_section(data))
    assert "| full cache | 1.000 | 3.5/4 | 100% | 2 / 1.5 | 2 / 1.5 |" in table
    assert "| `leankv@0.25` | 0.141 | 2/4 | 57% | 1 / 1 | 2 / 0 |" in table
    assert "`python -m benchmarks.lab --configs leankv@0.25`" in table

    # Beside the grid's score on the same prompts, where the grid has the configuration.
    grid = {"samples_per_task": 1, "configs": {"leankv@0.25": {"per_sample": [
        {"task": "passkey", "context_tokens": 1000, "correct": 1},
        {"task": "passkey", "context_tokens": 2000, "correct": 1},
        {"task": "vartrack", "context_tokens": 1000, "correct": 0.5},
        {"task": "vartrack", "context_tokens": 2000, "correct": 0},
        {"task": "qa", "context_tokens": 1000, "correct": 1},
        {"task": "passkey", "context_tokens": 4000, "correct": 1}]}}}
    monkeypatch.setattr(report, "_load", lambda name: grid if name == "accuracy_grid" else None)
    table = "\n".join(lab_section(data))
    assert "| `leankv@0.25` | 0.141 | 2/4 | 57% | 1 / 1 | 2 / 0 | 2.5 |" in table
    assert "| full cache | 1.000 | 3.5/4 | 100% | 2 / 1.5 | 2 / 1.5 | |" in table


def test_kvpress_table_keeps_the_benchmark_order_and_names_a_failing_press(monkeypatch):
    from benchmarks import report

    def row(correct):
        return {"correct": correct, "per_task": {"passkey": correct}, "error": None}

    data = {"kvpress_version": "0.5.5", "transformers_version": "5.2.0", "samples_per_task": 2,
            "tasks": ["passkey"],
            "configs": {"full": row(2), "snapkv@0.25": row(1), "streamingllm@0.25": row(0),
                        "pyramidkv@0.25": {**row(0), "errors": 2,
                                           "error": "RuntimeError: sizes differ; RuntimeError: x"}}}
    monkeypatch.setattr(report, "_load", lambda name: None)
    table = report.kvpress_section(data)
    methods = [line.split(" | ")[0] for line in table if line.startswith("| ") and "@" not in line]
    assert methods[2:] == ["| full", "| snapkv", "| pyramidkv", "| streamingllm"]
    assert ("| pyramidkv | 0.25 | fails on 2 of 2 prompts (RuntimeError, below) | not run | "
            "not run |") in table
    assert table[-1] == "kvpress's errors, the first of each configuration: pyramidkv@0.25: " \
                        "`RuntimeError: sizes differ`."
