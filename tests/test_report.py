"""The README's results tables, rendered from results JSON (synthetic here)."""

from __future__ import annotations

from benchmarks.report import fidelity_section, offline_throughput_section, render
from benchmarks.throughput import arguments


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
            "kv_bytes": 8e8, "ample_kv_bytes": 4e9,
            "configs": {"plain-ample": row(20.0), "plain": row(10.0), "pyramidkv@0.25": row(19.0)}}
    table = "\n".join(offline_throughput_section(data))
    assert "| pyramidkv@0.25 | 19.0 | 1.90x | 0.95x | 0.190 | 600 |" in table
    assert "`python -m benchmarks.throughput --modes offline`" in table


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
