"""Regenerate README's results section from results/*.json (no hand-typed numbers).

    python -m benchmarks.report

Rewrites the text between ``<!-- results:begin -->`` and ``<!-- results:end -->``.
Every table names the command that produced it; a benchmark not run yet is
listed as such.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
RESULTS = Path("results")


def _load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _n(count: float) -> str:
    """A count of correct answers: whole, or with RULER's partial credit."""
    return f"{round(count, 2):g}"


def _on(data: dict) -> str:
    """" on <machine>" for results that name the machine they ran on (older ones do not)."""
    return f" on {data['machine']}" if "machine" in data else ""


def memory_section(data: dict) -> list[str]:
    lines = [
        "### Bytes per stored token",
        "",
        f"`python -m benchmarks.memory` (head_dim {data['head_dim']}, {data['layers']} layers x "
        f"{data['kv_heads']} KV heads; scales and slot metadata included)",
        "",
        "| format | policy | bytes / token-head (bf16 model) | vs bf16 cache | vs fp32 cache |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for r in data["rows"]:
        if r["policy"] in ("none", "h2o"):
            lines.append(f"| {r['format']} | {r['policy']} | {r['token_head_bytes_bf16']} | "
                         f"{r['vs_bf16']:.3f} | {r['vs_fp32']:.3f} |")
    return lines


def fidelity_section(data: dict, name: str = "fidelity",
                     title: str = "Fidelity to the full cache") -> list[str]:
    command = data.get("command", "python -m benchmarks.fidelity")
    lines = [
        f"### {title}",
        "",
        f"`{command}`" + _on(data)
        + f" ({data['prompts']} prompts of ~{data['context_tokens']} "
        f"tokens, {data['tokens']} greedy tokens each, against plain vLLM in the same run; "
        "agreement and KL teacher-forced along plain vLLM's continuation, prefix free-running)",
        "",
        f"| configuration | KV tokens in {data['kv_bytes'] / 1e6:.0f} MB | greedy agreement "
        "| KL (top-20 est.) | free-running tokens before first difference |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for config, r in data["configs"].items():
        if "error" in r:
            lines.append(f"| {config} | cannot run on this machine: {r['error']} | | | |")
        else:
            lines.append(f"| {config} | {r['kv_tokens']} | {100 * r['agreement']:.1f}% | "
                         f"{max(r['kl'], 0.0):.4f} | {r['prefix_tokens']:.0f} |")  # float noise below 0
    lines += ["", f"![{name}](results/{name}.png)"]
    return lines


def policies_fidelity_section(data: dict) -> list[str]:
    return fidelity_section(data, "fidelity_policies", "Fidelity of the eviction policies")


def accuracy_section(data: dict) -> list[str]:
    tasks, configs = data["tasks"], data["configs"]
    budgets = sorted({float(n.split("@")[1]) for n in configs if "@" in n}, reverse=True)
    full = configs["full"]
    lines = [
        "### Long-context accuracy",
        "",
        f"`python -m benchmarks.accuracy` ({' and '.join(tasks)}, {data['samples_per_task']} "
        f"prompts each of ~{data['context_tokens']} tokens; plain vLLM's full cache in the same "
        f"run: {_n(full['correct'])}/{full['total']}). A cell: correct answers "
        f"({' + '.join(tasks)}) and the share of the full cache's.",
        "",
        "| policy | " + " | ".join(f"budget {b:g}" for b in budgets) + " |",
        "| --- | " + " | ".join("---:" for _ in budgets) + " |",
    ]
    for policy in dict.fromkeys(n.split("@")[0] for n in configs if "@" in n):
        cells = []
        for b in budgets:
            r = configs.get(f"{policy}@{b}") or configs.get(f"{policy}@{b:g}")
            if r is None:
                cells.append("")
                continue
            split = " + ".join(_n(r["per_task"][t]) for t in tasks)
            rel = "" if r["relative"] is None else f" ({100 * r['relative']:.0f}%)"
            cells.append(f"{_n(r['correct'])}/{r['total']} = {split}{rel}")
        lines.append(f"| {policy} | " + " | ".join(cells) + " |")
    lines += ["", "![accuracy](results/accuracy.png)"]
    return lines


def accuracy_grid_section(
    data: dict, name: str = "accuracy_grid",
    title: str = "Long-context accuracy over lengths and budgets",
) -> list[str]:
    """Several tasks, lengths and budgets: the full cache per task, then each policy's share."""
    tasks, configs, contexts = data["tasks"], data["configs"], data["context_tokens"]
    contexts = [contexts] if isinstance(contexts, int) else contexts
    budgets = sorted({float(n.split("@")[1]) for n in configs if "@" in n}, reverse=True)
    per = data["samples_per_task"]
    command = data.get("command", "python -m benchmarks.accuracy")
    if "full" not in configs:  # still running: nothing is measured at every length yet
        return [f"### {title}", "",
                f"`{command}`: not finished; "
                f"measured so far: {', '.join(data.get('incomplete', {})) or 'nothing'}."]
    full = configs["full"]

    def part(r: dict, ctx: int) -> dict:
        return r["per_context"][str(ctx)] if "per_context" in r else r

    earlier = data.get("resumed_from", [])
    # A grid filled in over many resumed runs would bury the table under its commands.
    source = (f"`{command}`" if not earlier else
              f"{len(earlier) + 1} runs of `benchmarks.accuracy` gathered in one file with "
              "`--resume` or `--merge` (listed below the table" + "".join(
                  f"; `{f}`, run beside them on the other core, folded in with `--merge`"
                  for f in data.get("merged_from", [])) + ")")
    lines = [
        f"### {title}",
        "",
        source + _on(data) + f" ({len(tasks)} tasks, {per} "
        f"prompts each at ~{', '.join(map(str, contexts))} tokens, plain vLLM's full cache in the "
        "same run; a sample scores the share of its answers found, RULER's string match). "
        f"The full cache's score per task, out of {per}:",
        "",
        "| task | " + " | ".join(f"~{c} tokens" for c in contexts) + " |",
        "| --- | " + " | ".join("---:" for _ in contexts) + " |",
    ]
    for task in tasks:
        lines.append(f"| {task} | " + " | ".join(_n(part(full, c)["per_task"][task])
                                                  for c in contexts) + " |")
    lines += [
        "",
        f"Each policy: correct answers over every task and length, and the share of the full "
        f"cache's ({_n(full['correct'])}/{full['total']})"
        + (f", then the share at each length ({' / '.join(map(str, contexts))} tokens)."
           if len(contexts) > 1 else "."),
        "",
        "| policy | " + " | ".join(f"budget {b:g}" for b in budgets) + " |",
        "| --- | " + " | ".join("---:" for _ in budgets) + " |",
    ]
    shares: dict[float, dict[str, float]] = {b: {} for b in budgets}
    for policy in dict.fromkeys(n.split("@")[0] for n in configs if "@" in n):
        cells = []
        for b in budgets:
            r = configs.get(f"{policy}@{b}") or configs.get(f"{policy}@{b:g}")
            if r is None:
                cells.append("")
                continue
            rel = ""
            if r["relative"] is not None:
                shares[b][policy] = r["relative"]
                each = [part(r, c).get("relative") for c in contexts] if len(contexts) > 1 else []
                rel = f" ({100 * r['relative']:.0f}%" + (": " + " / ".join(
                    "-" if v is None else f"{100 * v:.0f}" for v in each) if each else "") + ")"
            cells.append(f"{_n(r['correct'])}/{r['total']}{rel}")
        lines.append(f"| {policy} | " + " | ".join(cells) + " |")
    targets = []
    for b, bar in ((0.25, 0.95), (0.1, 0.85)):
        if shares.get(b):
            met = [p for p, v in shares[b].items() if v >= bar]
            missed = [f"{p} ({100 * v:.0f}%)" for p, v in shares[b].items() if v < bar]
            targets.append(f"at budget {b:g}, >= {100 * bar:.0f}% of the full cache: "
                           f"met by {', '.join(met) or 'none'}"
                           + (f"; missed by {', '.join(missed)}" if missed else ""))
    if targets:
        lines += ["", "Targets: " + "; ".join(targets) + "."]
    lines += ["", f"![{name}](results/{name}.png)"]
    if earlier:
        lines += ["", "<details><summary>The commands behind these numbers</summary>", "",
                  *(f"- `{c}`" for c in [*earlier, command]), "", "</details>"]
    return lines


def _grid(name: str, title: str) -> Callable[[dict], list[str]]:
    """The grid's section for another grid-shaped results file, under its own title and plot."""
    return lambda data: accuracy_grid_section(data, name, title)


def kvpress_section(data: dict) -> list[str]:
    ours = (_load("accuracy") or {}).get("configs", {})
    # The same presses with the question compressed too (``--split none``), when run.
    whole = (_load("kvpress_split_none") or {}).get("configs", {})
    total = data["samples_per_task"] * len(data["tasks"])
    lines = [
        "### Against NVIDIA kvpress",
        "",
        f"`python -m benchmarks.kvpress_compare` (kvpress {data['kvpress_version']}, transformers "
        f"{data['transformers_version']}, in a venv of its own) on the accuracy benchmark's "
        f"{total} prompts, and `--split none --out results/kvpress_split_none.json`; our column "
        "is `benchmarks.accuracy`'s (the full cache there is plain vLLM). Correct answers out of "
        f"{total} ({' + '.join(data['tasks'])}). kvpress's pipeline normally compresses the "
        "context without the question, so its window never sees it; with `--split none` the "
        "question is compressed with the rest, as our plugin does (its window ends on the question).",
        "",
        "| method | budget | kvpress, question apart | kvpress, question compressed | vllm-kvcompress |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]

    def cell(r: dict | None) -> str:
        if r is None:
            return "not run"
        if r.get("error"):
            kind = r["error"].split(":", 1)[0]
            failed = r.get("errors", total)
            return f"fails on {failed} of {total} prompts ({kind}, below)"
        return f"{_n(r['correct'])} = " + " + ".join(_n(r["per_task"][t]) for t in data["tasks"])

    # The benchmark's order (full, then its presses), whatever order a --resume measured them in.
    from benchmarks.kvpress_compare import PRESSES

    order = ["full", *PRESSES]
    for name, r in sorted(data["configs"].items(),
                          key=lambda item: order.index(item[0].partition("@")[0])):
        method, _, budget = name.partition("@")
        lines.append(f"| {method} | {budget or '1.0'} | {cell(r)} | {cell(whole.get(name))} | "
                     f"{cell(ours.get(name))} |")
    failed = {name: r["error"].split("; ")[0] for name, r in data["configs"].items()
              if r.get("error")}
    if failed:
        lines += ["", "kvpress's errors, the first of each configuration: " + "; ".join(
            f"{name}: `{error}`" for name, error in failed.items()) + "."]
    return lines


def tuning_section(data: dict) -> list[str]:
    configs, contexts = data["configs"], data["context_tokens"]
    full = configs.get("full")
    lines = [
        f"### Choosing {data['policy']}'s {data['arg']} (held-out prompts)",
        "",
        f"`{data['command']}`{_on(data)} ({', '.join(data['tasks'])}; "
        f"{data['samples_per_task']} prompts each at ~{', '.join(map(str, contexts))} tokens, "
        f"drawn with other seeds and at other depths than the grid's; budget {data['budget']:g}"
        + (f"; plain vLLM's full cache in the same run: {_n(full['correct'])}/{full['total']}"
           if full else "") + ").",
        "",
        f"| {data['arg']} | score | of the full cache | "
        + " / ".join(map(str, contexts)) + " tokens |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, r in configs.items():
        rel = "" if r.get("relative") is None else f"{100 * r['relative']:.0f}%"
        split = " / ".join(_n(r["per_context"][str(c)]) for c in contexts)
        label = "full cache" if name == "full" else name.partition("=")[2]
        lines.append(f"| {label} | {_n(r['correct'])}/{r['total']} | {rel} | {split} |")
    lines += ["", f"![tuning](results/tuning_{data['policy']}_{data['arg']}.png)"]
    return lines


def lab_section(data: dict) -> list[str]:
    configs, contexts, tasks = data["configs"], data["context_tokens"], data["tasks"]
    full = configs["full"]
    grid = _load("accuracy_grid")
    if data["held_out"] or not grid or grid["samples_per_task"] != data["samples_per_task"]:
        grid = None  # other prompts than the lab's: nothing to compare with
    prompts = "benchmarks.tuning's held-out prompts" if data["held_out"] else "the grid's prompts"
    lines = [
        "### Policy lab: score against the KV actually kept",
        "",
        f"`{data['command']}`{_on(data)} ({', '.join(tasks)}; "
        f"{data['samples_per_task']} of {prompts} per task at ~"
        f"{', '.join(map(str, contexts))} tokens; the full cache in the same run: "
        f"{_n(full['correct'])}/{len(full['per_sample'])}). One transformers prefill a prompt, "
        "every configuration's decode over it with the evicted keys masked out: an exploration "
        "tool, not the serving path (no page formats: LeanKV here is its selection without "
        "K8V4). *kept*: the share of the prompt's token-heads a configuration kept."
        + (" *vLLM grid*: the accuracy grid's score on the same prompts, served by vLLM."
           if grid else ""),
        "",
        "| configuration | kept | score | of the full cache | "
        + " / ".join(map(str, contexts)) + " tokens | " + " / ".join(tasks) + " |"
        + (" vLLM grid |" if grid else ""),
        "| --- | ---: | ---: | ---: | ---: | ---: |" + (" ---: |" if grid else ""),
    ]
    for name, r in configs.items():
        rel = "" if r.get("relative") is None else f"{100 * r['relative']:.0f}%"
        split = " / ".join(_n(r["per_context"][str(c)]) for c in contexts)
        per_task = " / ".join(_n(r["per_task"][t]) for t in tasks)
        label = "full cache" if name == "full" else f"`{name}`"
        line = (f"| {label} | {r['kept']:.3f} | {_n(r['correct'])}/{len(r['per_sample'])} | "
                f"{rel} | {split} | {per_task} |")
        if grid:
            served = grid["configs"].get(name)
            rows = [s for s in served["per_sample"] if s["task"] in tasks
                    and s["context_tokens"] in contexts] if served else []
            same = served and len(rows) == len(r["per_sample"])
            line += f" {_n(sum(s['correct'] for s in rows))} |" if same else " |"
        lines.append(line)
    return lines


def scoring_section(data: dict) -> list[str]:
    lines = [
        "### Selection time (ChunkKV's layer-wise index reuse)",
        "",
        f"`python -m benchmarks.scoring` (one {data['tokens']}-token prompt, {data['layers']} "
        f"layers of the default model's shape, {data['threads']} threads; median)",
        "",
        "| setting | ms per prompt | vs ChunkKV without reuse |",
        "| --- | ---: | ---: |",
    ]
    for name, r in data["rows"].items():
        lines.append(f"| {name} | {1000 * r['seconds']:.0f} | {r['vs_chunkkv_no_reuse']:.2f}x |")
    return lines


def kernels_section(data: dict) -> list[str]:
    methods = [k for k in data["rows"][0] if isinstance(data["rows"][0][k], dict)]
    lines = [
        "### Decode step of one layer",
        "",
        f"`{data.get('command', 'python -m benchmarks.kernels')}` on {data['device']} "
        f"({data['threads']} threads, "
        f"{data['dtype']}, {data['kv_heads']} KV heads x {data['group']} query heads, head_dim "
        f"{data['head_dim']}, pages of {data['page_size']}); ms per step",
        "",
        "| context | batch | " + " | ".join(methods) + " |",
        "| ---: | ---: | " + " | ".join("---:" for _ in methods) + " |",
    ]
    for r in data["rows"]:
        cells = " | ".join(f"{r[m]['ms']:.2f}" if m in r else "" for m in methods)
        lines.append(f"| {r['context']} | {r['batch']} | {cells} |")
    ours = [m for m in methods if m.startswith("cpu-paged-")]
    rows = [r for r in data["rows"] if "vllm-cpu" in r]
    if ours and rows:  # issue 6's CPU bar: no slower than vLLM's op over the same tokens
        spans = []
        for m in ours:
            ratios = [r[m]["ms"] / r["vllm-cpu"]["ms"] for r in rows if m in r]
            wins = sum(x <= 1 for x in ratios)
            spans.append(f"{m.removeprefix('cpu-paged-')} {min(ratios):.2f}-{max(ratios):.2f}x "
                         f"(no slower at {wins} of {len(ratios)} shapes)")
        lines += ["", "Our kernel's time over vLLM's CPU op's, same tokens: "
                  + "; ".join(spans) + "."]
    return lines


def throughput_section(data: dict, title: str = "Throughput under memory pressure",
                       image: str = "throughput") -> list[str]:
    configs = data["configs"]
    plain, ample = configs.get("plain"), configs.get("plain-ample")
    level = max(next(iter(configs.values()))["online"], key=int)  # the highest concurrency run

    def tps(row: dict | None) -> float | None:
        return None if row is None else row["online"][level]["output_tokens_per_s"]

    lines = [
        f"### {title}",
        "",
        f"`{data.get('command', 'python -m benchmarks.throughput')}`"
        + _on(data) + f" ({data['requests']} requests, prompts "
        f"{data['prompt_tokens'][0]}-{data['prompt_tokens'][1]} tokens, outputs "
        f"{data['output_tokens'][0]}-{data['output_tokens'][1]} tokens, greedy, {level} streaming "
        f"clients; a KV space of {data['kv_bytes'] / 1e6:.0f} MB, where plain vLLM runs "
        "4 of the longest requests at once; `plain-ample`: plain vLLM with "
        f"{data['ample_kv_bytes'] / 1e6:.0f} MB, the ceiling). Each configuration is its own "
        "`vllm serve`, one after the other in the same run.",
        "",
        "| configuration | output tok/s | vs plain | vs ample | requests/s | peak running "
        "| TTFT p50 / p99 (s) | TPOT p50 / p99 (ms) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, row in configs.items():
        r = row["online"][level]
        vs = [f"{tps(row) / tps(ref):.2f}x" if ref is not None else ""
              for ref in (plain, ample)]
        lines.append(
            f"| {name} | {r['output_tokens_per_s']:.1f} | {vs[0]} | {vs[1]} | "
            f"{r['requests_per_s']:.3f} | {r['peak_running']:.0f} | "
            f"{r['ttft_p50_s']:.1f} / {r['ttft_p99_s']:.1f} | "
            f"{1000 * r['tpot_p50_s']:.0f} / {1000 * r['tpot_p99_s']:.0f} |")
    if plain is not None and ample is not None:
        lines += ["", f"The ceiling: with memory for every request, plain vLLM is "
                  f"{tps(ample) / tps(plain):.2f}x faster than in the tight space, so that is the "
                  "most compression can gain in this run."]
    lines += _concurrency_sweep(configs, plain)
    offline = {n: row["offline"] for n, row in configs.items() if "offline" in row}
    if offline:
        lines += ["", "Offline (`--offline`, `LLM.generate` over the same prompts): " + ", ".join(
            f"{n} {r['output_tokens_per_s']:.1f} tok/s" for n, r in offline.items()) + "."]
    lines += ["", f"![{image}](results/{image}.png)"]
    return lines


def _concurrency_sweep(configs: dict, plain: dict | None) -> list[str]:
    """Output tok/s at every concurrency the run swept (nothing for a run of one level)."""
    levels = sorted(next(iter(configs.values()))["online"], key=int)
    if len(levels) < 2:
        return []
    lines = ["", "Output tok/s by the number of streaming clients (vs plain vLLM at the same "
             "number):", "", "| configuration | " + " | ".join(f"{c} clients" for c in levels)
             + " |", "| --- | " + " | ".join("---:" for _ in levels) + " |"]
    for name, row in configs.items():
        cells = []
        for c in levels:
            tps = row["online"][c]["output_tokens_per_s"]
            base = plain["online"][c]["output_tokens_per_s"] if plain else None
            cells.append(f"{tps:.1f}" + (f" ({tps / base:.2f}x)" if base and row is not plain
                                         else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def decode_throughput_section(data: dict) -> list[str]:
    return throughput_section(data, "Throughput under memory pressure, decode-heavy",
                              "throughput_decode")


def offline_throughput_section(data: dict) -> list[str]:
    configs = data["configs"]

    def tps(name: str) -> float | None:
        return configs[name]["offline"]["output_tokens_per_s"] if name in configs else None

    lines = [
        "### Throughput under memory pressure, offline",
        "",
        f"`{data.get('command', 'python -m benchmarks.throughput --modes offline')}`"
        + _on(data) + " (`LLM.generate` over "
        f"{data['requests']} prompts of {data['prompt_tokens'][0]}-{data['prompt_tokens'][1]} "
        f"tokens, outputs {data['output_tokens'][0]}-{data['output_tokens'][1]} tokens, all "
        "submitted at once; KV space "
        f"{data['kv_bytes'] / 1e6:.0f} MB, `plain-ample` {data['ample_kv_bytes'] / 1e6:.0f} MB; "
        "each configuration its own engine, one after the other in the same run)",
        "",
        "| configuration | output tok/s | vs plain | vs ample | requests/s | seconds |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, row in configs.items():
        r = row["offline"]
        vs = [f"{r['output_tokens_per_s'] / tps(ref):.2f}x" if tps(ref) else ""
              for ref in ("plain", "plain-ample")]
        lines.append(f"| {name} | {r['output_tokens_per_s']:.1f} | {vs[0]} | {vs[1]} | "
                     f"{r['requests_per_s']:.3f} | {r['elapsed_s']:.0f} |")
    lines += ["", "![throughput_offline](results/throughput_offline.png)"]
    return lines


SECTIONS = {"throughput": throughput_section, "throughput_decode": decode_throughput_section,
            "throughput_offline": offline_throughput_section,
            "memory": memory_section,
            "fidelity": fidelity_section, "fidelity_policies": policies_fidelity_section,
            "accuracy": accuracy_section, "accuracy_grid": accuracy_grid_section,
            "accuracy_1k": _grid("accuracy_1k",
                                 "Long-context accuracy at ~1000 tokens, with more prompts"),
            "accuracy_8k": _grid("accuracy_8k",
                                 "Long-context accuracy near the model's 8K context"),
            "tuning_pyramidkv_beta": tuning_section, "lab": lab_section,
            "kvpress": kvpress_section, "scoring": scoring_section, "kernels": kernels_section}
# The benchmark behind each results file, where its name is not the file's.
COMMANDS = {"throughput_decode": "python -m benchmarks.throughput --prompt-tokens 1000 2000 "
                                 "--output-tokens 512 512 --out results/throughput_decode.json",
            "throughput_offline": "python -m benchmarks.throughput --modes offline "
                                  "--out results/throughput_offline.json",
            "fidelity_policies": "python -m benchmarks.fidelity --configs plain snapkv@0.25 ... "
                                 "--out results/fidelity_policies.json",
            "accuracy_grid": "python -m benchmarks.accuracy --contexts 1000 2000 4000 --tasks ... "
                             "--out results/accuracy_grid.json",
            "accuracy_1k": "python -m benchmarks.accuracy --contexts 1000 --samples 12 --tasks ... "
                           "--out results/accuracy_1k.json",
            "accuracy_8k": "python -m benchmarks.accuracy --contexts 7500 --tasks ... "
                           "--out results/accuracy_8k.json",
            "tuning_pyramidkv_beta": "python -m benchmarks.tuning --policy pyramidkv --arg beta "
                                     "--values 20 5 2"}


def render() -> str:
    lines: list[str] = []
    for name, section in SECTIONS.items():
        data = _load(name)
        if data is None:
            command = COMMANDS.get(name, f"python -m benchmarks.{name}")
            lines += [f"### {name}", "", f"Not run yet: `{command}`."]
        else:
            lines += section(data)
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    readme = Path("README.md")
    text = readme.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{BEGIN}\n{render()}\n{END}{tail}")
    print("README.md results section regenerated")


if __name__ == "__main__":
    main()
