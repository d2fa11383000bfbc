"""Render docs/results.md and README.md's generated blocks from results/*.json.

    python -m benchmarks.report

The numbers come only from the results files; a table's title, command and machine come from
the file's own metadata where it has them (``title``, ``command``, ``machine`` or ``device``),
and every sentence around the numbers from ``benchmarks/report.yaml``. One renderer per shape
of results file (``KINDS``) turns it into table lines plus the values the YAML's templates may
name. README.md keeps its own text; only what lies between ``<!-- NAME:begin -->`` and
``<!-- NAME:end -->`` is rewritten (``readme:`` in the YAML).
"""

from __future__ import annotations

import json
import string
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"
SPEC = Path(__file__).with_name("report.yaml")
RESULTS_MD = ROOT / "docs" / "results.md"
README = ROOT / "README.md"


def load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def spec() -> dict:
    return yaml.safe_load(SPEC.read_text())


def _n(count: float) -> str:
    """A count of correct answers: whole, or with RULER's partial credit."""
    return f"{round(count, 2):g}"


def _seq(value) -> list:
    return value if isinstance(value, (list, tuple)) else [value]


class _Formatter(string.Formatter):
    JOINS: ClassVar[dict[str, str]] = {"list": ", ", "and": " and ", "plus": " + ",
                                       "slash": " / "}

    def format_field(self, value, spec: str) -> str:
        if spec in self.JOINS:
            return self.JOINS[spec].join(map(str, _seq(value)))
        if spec == "MB":
            return f"{value / 1e6:.0f} MB"
        if spec == "n":
            return _n(value)
        if spec == "pct":
            return f"{100 * value:.0f}%"
        if spec == "ms":  # seconds, shown in milliseconds
            return f"{1000 * value:.0f}"
        if spec == "range":
            low, high = value
            return str(low) if low == high else f"{low}-{high}"
        return super().format_field(value, spec)


def fill(template: str, values: dict) -> str:
    return _Formatter().vformat(template, (), values)


def table(header: list[str], rows: list[list[str]], align: str | None = None) -> list[str]:
    """A markdown table; ``align`` has an ``l`` or ``r`` a column (default: first left)."""
    align = align or "l" + "r" * (len(header) - 1)
    return ["| " + " | ".join(header) + " |",
            "| " + " | ".join("---:" if a == "r" else "---" for a in align) + " |",
            *("| " + " | ".join(map(str, r)) + " |" for r in rows)]


@dataclass
class Rendered:
    lines: list[str]  # the table(s), right after the section's opening line
    values: dict = field(default_factory=dict)  # for the YAML's templates
    after: list[str] = field(default_factory=list)  # after the notes, before the plot
    details: list[str] = field(default_factory=list)  # last (a collapsed list of commands)


# --- renderers: one per shape of results file --------------------------------------------


def throughput(data: dict, spec: dict) -> Rendered:
    """Online runs; values: level (the most clients), ceiling (ample over plain), offline."""
    configs = data["configs"]
    plain, ample = configs.get("plain"), configs.get("plain-ample")
    levels = sorted(next(iter(configs.values()))["online"], key=int)
    level = levels[-1]

    def tps(row: dict | None, at: str = level) -> float | None:
        return None if row is None else row["online"][at]["output_tokens_per_s"]

    rows = []
    for name, row in configs.items():
        r = row["online"][level]
        vs = [f"{tps(row) / tps(ref):.2f}x" if ref is not None else "" for ref in (plain, ample)]
        rows.append([name, f"{r['output_tokens_per_s']:.1f}", *vs, f"{r['requests_per_s']:.3f}",
                     f"{r['peak_running']:.0f}", f"{r['ttft_p50_s']:.1f} / {r['ttft_p99_s']:.1f}",
                     f"{1000 * r['tpot_p50_s']:.0f} / {1000 * r['tpot_p99_s']:.0f}"])
    out = Rendered(table(["configuration", "output tok/s", "vs plain", "vs ample", "requests/s",
                          "peak running", "TTFT p50 / p99 (s)", "TPOT p50 / p99 (ms)"], rows),
                   {"level": level})
    if plain is not None and ample is not None:
        out.values["ceiling"] = tps(ample) / tps(plain)
    if len(levels) > 1:  # a concurrency sweep: tok/s at every level, against plain at that level
        sweep = []
        for name, row in configs.items():
            cells = [f"{tps(row, c):.1f}" + (f" ({tps(row, c) / tps(plain, c):.2f}x)"
                                            if plain is not None and row is not plain else "")
                     for c in levels]
            sweep.append([name, *cells])
        out.after += ["", spec["sweep_caption"], "",
                      *table(["configuration", *(f"{c} clients" for c in levels)], sweep)]
    offline = {n: row["offline"] for n, row in configs.items() if "offline" in row}
    if offline:
        out.values["offline"] = ", ".join(f"{n} {r['output_tokens_per_s']:.1f} tok/s"
                                          for n, r in offline.items())
        out.after += ["", fill(spec["offline_caption"], out.values)]
    return out


def offline_throughput(data: dict, spec: dict) -> Rendered:
    configs = data["configs"]

    def tps(name: str) -> float | None:
        return configs[name]["offline"]["output_tokens_per_s"] if name in configs else None

    rows = []
    for name, row in configs.items():
        r = row["offline"]
        vs = [f"{r['output_tokens_per_s'] / tps(ref):.2f}x" if tps(ref) else ""
              for ref in ("plain", "plain-ample")]
        rows.append([name, f"{r['output_tokens_per_s']:.1f}", *vs, f"{r['requests_per_s']:.3f}",
                     f"{r['elapsed_s']:.0f}"])
    return Rendered(table(["configuration", "output tok/s", "vs plain", "vs ample",
                           "requests/s", "seconds"], rows))


def rows(data: dict, spec: dict) -> Rendered:
    """``data["rows"]`` (a list, or a dict whose keys become ``name``) under the YAML's columns."""
    items = data["rows"]
    items = [{"name": k, **v} for k, v in items.items()] if isinstance(items, dict) else items
    columns = spec["columns"]
    return Rendered(table([c["header"] for c in columns],
                          [[fill(c["cell"], r) for c in columns] for r in items],
                          "".join("r" if c.get("align") == "right" else "l" for c in columns)))


def fidelity(data: dict, spec: dict) -> Rendered:
    body = []
    for name, r in data["configs"].items():
        if "error" in r:
            body.append([name, f"cannot run on this machine: {r['error']}", "", "", ""])
        else:  # KL: float noise can fall below 0
            body.append([name, r["kv_tokens"], f"{100 * r['agreement']:.1f}%",
                         f"{max(r['kl'], 0.0):.4f}", f"{r['prefix_tokens']:.0f}"])
    return Rendered(table(["configuration", f"KV tokens in {data['kv_bytes'] / 1e6:.0f} MB",
                           "greedy agreement", "KL (top-20 est.)",
                           "free-running tokens before first difference"], body))


def _budgets(configs: dict) -> list[float]:
    return sorted({float(n.split("@")[1]) for n in configs if "@" in n}, reverse=True)


def _policies(configs: dict) -> list[str]:
    return list(dict.fromkeys(n.split("@")[0] for n in configs if "@" in n))


def _at(configs: dict, policy: str, budget: float) -> dict | None:
    return configs.get(f"{policy}@{budget}") or configs.get(f"{policy}@{budget:g}")


def accuracy(data: dict, spec: dict) -> Rendered:
    """Values: full_correct, full_total (plain vLLM's full cache)."""
    tasks, configs = data["tasks"], data["configs"]
    budgets = _budgets(configs)
    body = []
    for policy in _policies(configs):
        cells = []
        for b in budgets:
            r = _at(configs, policy, b)
            if r is None:
                cells.append("")
                continue
            rel = "" if r["relative"] is None else f" ({100 * r['relative']:.0f}%)"
            split = " + ".join(_n(r["per_task"][t]) for t in tasks)
            cells.append(f"{_n(r['correct'])}/{r['total']} = {split}{rel}")
        body.append([policy, *cells])
    full = configs["full"]
    return Rendered(table(["policy", *(f"budget {b:g}" for b in budgets)], body),
                    {"full_correct": full["correct"], "full_total": full["total"]})


def accuracy_grid(data: dict, spec: dict) -> Rendered:
    """Tasks x lengths x budgets: the full cache per task, then each policy's share; the YAML's
    targets. Values: task_count, contexts, full_correct, full_total, runs, merged, per_length."""
    tasks, configs = data["tasks"], data["configs"]
    contexts = _seq(data["context_tokens"])
    values = {"task_count": len(tasks), "contexts": contexts}
    earlier = data.get("resumed_from", [])
    if earlier:  # gathered over many runs: their commands go below the table, not in the header
        values["merged"] = "".join(fill(spec["merged"], {"file": f})
                                   for f in data.get("merged_from", []))
        values["runs"] = len(earlier) + 1
        values["source"] = fill(spec["gathered"], values)
    if "full" not in configs:  # still running: nothing is measured at every length yet
        values["measured"] = ", ".join(data.get("incomplete", {})) or "nothing"
        return Rendered([fill(spec["unfinished"], values)], values)
    full = configs["full"]
    values.update(full_correct=full["correct"], full_total=full["total"],
                  per_length=fill(spec["per_length"], values) if len(contexts) > 1 else "")

    def part(r: dict, ctx: int) -> dict:
        return r["per_context"][str(ctx)] if "per_context" in r else r

    lines = [fill(spec["full_caption"], {**data, **values}), "",
             *table(["task", *(f"~{c} tokens" for c in contexts)],
                    [[t, *(_n(part(full, c)["per_task"][t]) for c in contexts)] for t in tasks]),
             "", fill(spec["policy_caption"], {**data, **values}), ""]
    budgets = _budgets(configs)
    shares: dict[float, dict[str, float]] = {b: {} for b in budgets}
    body = []
    for policy in _policies(configs):
        cells = []
        for b in budgets:
            r = _at(configs, policy, b)
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
        body.append([policy, *cells])
    lines += table(["policy", *(f"budget {b:g}" for b in budgets)], body)
    out = Rendered(lines, values)
    verdicts = []
    for target in spec.get("targets", []):
        got = shares.get(target["budget"])
        if got:
            missed = [f"{p} ({100 * v:.0f}%)" for p, v in got.items() if v < target["share"]]
            verdicts.append(fill(spec["target"], {
                **target, "met": ", ".join(p for p, v in got.items() if v >= target["share"])
                or "none", "missed": fill(spec["missed"], {"missed": ", ".join(missed)})
                if missed else ""}))
    if verdicts:
        out.values["targets"] = "; ".join(verdicts)
        out.after += ["", f"Targets: {out.values['targets']}."]
    if earlier:
        out.details = ["<details><summary>The commands behind these numbers</summary>", "",
                       *(f"- `{c}`" for c in [*earlier, data["command"]]), "", "</details>"]
    return out


def tuning(data: dict, spec: dict) -> Rendered:
    """Values: full_correct, full_total."""
    configs, contexts = data["configs"], data["context_tokens"]
    body = []
    for name, r in configs.items():
        rel = "" if r.get("relative") is None else f"{100 * r['relative']:.0f}%"
        label = "full cache" if name == "full" else name.partition("=")[2]
        body.append([label, f"{_n(r['correct'])}/{r['total']}", rel,
                     " / ".join(_n(r["per_context"][str(c)]) for c in contexts)])
    full = configs.get("full", {})
    return Rendered(table([data["arg"], "score", "of the full cache",
                           " / ".join(map(str, contexts)) + " tokens"], body),
                    {"full_correct": full.get("correct", 0), "full_total": full.get("total", 0)})


def lab(data: dict, spec: dict) -> Rendered:
    """Beside the ``compare_with`` grid's score on the same prompts, when they are the same.
    Values: full_correct, full_total, prompts, grid_column."""
    configs, contexts, tasks = data["configs"], data["context_tokens"], data["tasks"]
    grid = load(spec["compare_with"]) if spec.get("compare_with") else None
    if data["held_out"] or not grid or grid["samples_per_task"] != data["samples_per_task"]:
        grid = None  # other prompts than the lab's: nothing to compare with
    body = []
    for name, r in configs.items():
        rel = "" if r.get("relative") is None else f"{100 * r['relative']:.0f}%"
        row = ["full cache" if name == "full" else f"`{name}`", f"{r['kept']:.3f}",
               f"{_n(r['correct'])}/{len(r['per_sample'])}", rel,
               " / ".join(_n(r["per_context"][str(c)]) for c in contexts),
               " / ".join(_n(r["per_task"][t]) for t in tasks)]
        if grid:
            served = grid["configs"].get(name)
            got = [s for s in served["per_sample"] if s["task"] in tasks
                   and s["context_tokens"] in contexts] if served else []
            row.append(_n(sum(s["correct"] for s in got))
                       if served and len(got) == len(r["per_sample"]) else "")
        body.append(row)
    header = ["configuration", "kept", "score", "of the full cache",
              " / ".join(map(str, contexts)) + " tokens", " / ".join(tasks)]
    full = configs["full"]
    return Rendered(table(header + (["vLLM grid"] if grid else []), body), {
        "full_correct": full["correct"], "full_total": len(full["per_sample"]),
        "prompts": spec["held_out_prompts" if data["held_out"] else "prompts"],
        "grid_column": spec["grid_column"] if grid else ""})


def kvpress(data: dict, spec: dict) -> Rendered:
    """kvpress with the question apart, with it compressed (``question_compressed``), and ours
    (``ours``). Values: total, errors."""
    from benchmarks.kvpress_compare import PRESSES  # the benchmark's order, whatever was resumed

    ours = (load(spec["ours"]) or {}).get("configs", {})
    whole = (load(spec["question_compressed"]) or {}).get("configs", {})
    total = data["samples_per_task"] * len(data["tasks"])

    def cell(r: dict | None) -> str:
        if r is None:
            return "not run"
        if r.get("error"):
            return (f"fails on {r.get('errors', total)} of {total} prompts "
                    f"({r['error'].split(':', 1)[0]}, below)")
        return f"{_n(r['correct'])} = " + " + ".join(_n(r["per_task"][t]) for t in data["tasks"])

    order = ["full", *PRESSES]
    body = []
    for name, r in sorted(data["configs"].items(),
                          key=lambda item: order.index(item[0].partition("@")[0])):
        method, _, budget = name.partition("@")
        body.append([method, budget or "1.0", cell(r), cell(whole.get(name)),
                     cell(ours.get(name))])
    out = Rendered(table(["method", "budget", "kvpress, question apart",
                          "kvpress, question compressed", "vllm-kvcompress"], body,
                         "lrrrr"), {"total": total})
    failed = {name: r["error"].split("; ")[0] for name, r in data["configs"].items()
              if r.get("error")}
    if failed:
        out.values["errors"] = "; ".join(f"{n}: `{e}`" for n, e in failed.items())
    return out


def kernels(data: dict, spec: dict) -> Rendered:
    """ms per decode step by context and batch, one column a method (``cell`` formats one);
    ``compare``: each ``prefix`` method's time over the ``baseline``'s. Values: comparison."""
    methods = list(dict.fromkeys(k for r in data["rows"] for k, v in r.items()
                                 if isinstance(v, dict)))
    body = [[r["context"], r["batch"], *(fill(spec["cell"], r[m]) if m in r else ""
                                          for m in methods)] for r in data["rows"]]
    out = Rendered(table(["context", "batch", *methods], body, "r" * (2 + len(methods))))
    compare = spec.get("compare")
    if compare:
        base, spans = compare["baseline"], []
        for m in methods:
            if not m.startswith(compare["prefix"]):
                continue
            ratios = [r[m]["ms"] / r[base]["ms"] for r in data["rows"] if m in r and base in r]
            if ratios:
                wins = sum(x <= 1 for x in ratios)
                spans.append(f"{m.removeprefix(compare['prefix'])} {min(ratios):.2f}-"
                             f"{max(ratios):.2f}x (no slower at {wins} of {len(ratios)} shapes)")
        if spans:
            out.values["comparison"] = "; ".join(spans)
    return out


def tests(data: dict, spec: dict) -> Rendered:
    """pytest outcomes per test function. Values: passed, failed, skipped (totals)."""
    outcomes = ("passed", "failed", "skipped")
    totals = Counter()
    body = []
    for name, counts in data["tests"].items():
        totals.update(counts)
        body.append([f"`{name}`", *(counts.get(o, "") for o in outcomes)])
    body.append(["all", *(f"**{totals[o]}**" for o in outcomes)])
    return Rendered(table(["test", *outcomes], body), dict(totals))


def contract_summary(data: dict) -> list[str]:
    """Entries per vLLM version: ok, runner-removed, failed (every other status)."""
    body = []
    for version in data["vllm_versions"]:
        counts = data["summary"][version]
        failed = sum(v for k, v in counts.items() if k not in ("ok", "runner-removed"))
        body.append([version, counts.get("ok", 0), counts.get("runner-removed", 0), failed])
    return table(["vLLM", "ok", "runner-removed", "failed"], body)


def contract(data: dict, spec: dict) -> Rendered:
    out = Rendered(contract_summary(data))
    failures = [f"- {version}: `{e['entry']}`: {r['status']} ({r['detail']})"
                for e in data["entries"] for version, r in e["results"].items()
                if r["status"] not in ("ok", "runner-removed")]
    if failures:
        out.after += ["", spec["failures_caption"], "", *failures]
    return out


def long_generation(data: dict, spec: dict) -> Rendered:
    """KV held by one long generation per configuration: its peak and its last sample."""
    body = []
    for name, row in data["configs"].items():
        held = [s["held"] for s in row["samples"]]
        body.append([f"`{name}`", f"{max(held):.0f}", f"{held[-1]:.0f}",
                     f"{row.get('seconds', 0):.0f}"])
    return Rendered(table(["configuration", "peak KV tokens held", "held at the last sample",
                           "seconds"], body))


KINDS: dict[str, Callable[[dict, dict], Rendered]] = {
    "throughput": throughput, "offline_throughput": offline_throughput, "rows": rows,
    "fidelity": fidelity, "accuracy": accuracy, "accuracy_grid": accuracy_grid,
    "tuning": tuning, "lab": lab, "kvpress": kvpress, "kernels": kernels, "tests": tests,
    "contract": contract, "long_generation": long_generation}


# --- assembling --------------------------------------------------------------------------


def section(spec: dict, data: dict | None = None) -> list[str]:
    """One results file's section: title, where it came from, table(s), notes, plot."""
    name = spec["file"]
    data = load(name) if data is None else data
    meta = data or {}
    title = meta.get("title") or spec["title"]
    command = meta.get("command") or spec.get("command") or f"python -m benchmarks.{name}"
    if data is None:
        return [f"### {title}", "", f"Not run yet: `{command}`."]
    out = KINDS[spec["kind"]](data, spec)
    values = {**data, "command": command, **out.values}
    machine = data.get("machine") or data.get("device")
    head = out.values.get("source", f"`{command}`") + (f" on {machine}" if machine else "")
    if spec.get("intro"):
        head += f" ({fill(spec['intro'], values)})"
    lines = [f"### {title}", "", head.rstrip(".") + ".", "", *out.lines]
    for note in spec.get("notes", []):
        if isinstance(note, str) or note["when"] in out.values:
            lines += ["", fill(note if isinstance(note, str) else note["text"], values)]
    lines += out.after
    if (RESULTS / f"{name}.png").exists():
        lines += ["", f"![{name}](../results/{name}.png)"]
    if out.details:
        lines += ["", *out.details]
    return lines


def section_spec(name: str) -> dict:
    """The YAML's section for results file ``name``."""
    return next(s for g in spec()["groups"] for s in g["sections"] if s["file"] == name)


def _rendering(name: str) -> Callable[[dict], list[str]]:
    return lambda data: section(section_spec(name), data)


# The sections the benchmarks' own tests render (tests/test_tasks.py, tests/test_tuning.py).
accuracy_section = _rendering("accuracy")
accuracy_grid_section = _rendering("accuracy_grid")
tuning_section = _rendering("tuning_pyramidkv_beta")


def render_results(spec_: dict | None = None) -> str:
    """docs/results.md."""
    spec_ = spec_ or spec()
    lines = ["# Results", "", spec_["results_intro"].strip(), ""]
    for group in spec_["groups"]:
        lines += [f"- [{group['title']}](#{_anchor(group['title'])})"]
    for group in spec_["groups"]:
        lines += ["", f"## {group['title']}"]
        for s in group["sections"]:
            lines += ["", *section(s)]
    return "\n".join(lines) + "\n"


def _anchor(title: str) -> str:
    return "".join(c for c in title.lower().replace(" ", "-") if c.isalnum() or c == "-")


def _metric(data: dict, key: str, metric: str) -> str:
    row = data["configs"].get(key)
    if row is None:
        return ""
    if metric in ("online", "offline"):
        def tps(r: dict) -> float:
            if metric == "offline":
                return r["offline"]["output_tokens_per_s"]
            return r["online"][max(r["online"], key=int)]["output_tokens_per_s"]

        plain = data["configs"].get("plain")
        return f"{tps(row):.1f}" + (f" ({tps(row) / tps(plain):.2f}x)" if plain else "")
    if metric == "share":
        return "" if row.get("relative") is None else f"{100 * row['relative']:.0f}%"
    if metric == "agreement":
        return "" if "agreement" not in row else f"{100 * row['agreement']:.1f}%"
    raise ValueError(f"unknown headline metric {metric!r}")


def headline(block: dict) -> list[str]:
    """A few configurations against plain vLLM, one column a (results file, metric)."""
    files = {c["header"]: [(f, load(f)) for f in _seq(c["file"])] for c in block["columns"]}
    body = []
    for row in block["rows"]:
        cells = []
        for c in block["columns"]:
            got = ""
            for name, data in files[c["header"]]:
                key = row.get("as", {}).get(name, row["config"])
                got = got or (_metric(data, key, c["metric"]) if data else "")
            cells.append(got)
        body.append([row["label"], *cells])
    return [block["caption"].strip(), "",
            *table(["configuration", *(c["header"] for c in block["columns"])], body)]


def readme_blocks(spec_: dict | None = None) -> dict[str, str]:
    spec_ = spec_ or spec()
    readme = spec_["readme"]
    contract_data = load(readme["versions"]["file"])
    return {"headline": "\n".join(headline(readme["headline"])),
            "versions": "\n".join(contract_summary(contract_data) if contract_data
                                  else ["Contract check not run yet."])}


def splice(text: str, blocks: dict[str, str]) -> str:
    """``text`` with each ``<!-- NAME:begin -->`` ... ``<!-- NAME:end -->`` block replaced."""
    for name, body in blocks.items():
        begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
        if begin not in text or end not in text:
            raise ValueError(f"README.md has no {begin} ... {end} block")
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = f"{head}{begin}\n{body}\n{end}{tail}"
    return text


def main() -> None:
    RESULTS_MD.parent.mkdir(exist_ok=True)
    RESULTS_MD.write_text(render_results())
    README.write_text(splice(README.read_text(), readme_blocks()))
    print(f"regenerated {RESULTS_MD.relative_to(ROOT)} and README.md's generated blocks")


if __name__ == "__main__":
    main()
