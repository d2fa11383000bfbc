"""Contract check: every vLLM internal in ``vllm/surface.py`` exists as the adapters expect.

:func:`check_installed` inspects the installed vLLM; :func:`check_sources` reads a vLLM
source tree or wheel with ``ast``, so releases that cannot be installed here (CUDA-only
0.33, 0.34) are checked too. A method must take every parameter the adapters pass, in
order (or ``**kwargs``); a field must be declared where Python objects get one (dataclass
field, annotation, class attribute, property, enum member, ``self.<name> = ...`` in a
method of the class or a vLLM base). The V1 adapter's entries are ``runner-removed``, not
failed, where vLLM no longer ships the V1 runner (0.34): the V2 adapter serves there.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import importlib
import inspect
import json
import shlex
import subprocess
import sys
import textwrap
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllm_kvcompress.vllm.surface import SURFACE, V1_RUNNER, Touch

CACHE_DIR = Path.home() / ".cache" / "vllm-kvcompress" / "wheels"
PASSING = ("ok", "runner-removed")
_DEFS = (ast.FunctionDef, ast.AsyncFunctionDef)
# What a name resolved to: "class", "value" (not callable), "assigned" (ast cannot see
# what), or a callable's (named parameters, takes **kwargs, how many are positional).
Member = str | tuple[list[str], bool, int]


@dataclass(frozen=True)
class Result:
    entry: Touch
    status: str  # ok, runner-removed, missing-module, import-error, missing, kind, params
    detail: str = ""

    @property
    def failed(self) -> bool:
        return self.status not in PASSING


def _check(view: _Installed | Sources, entry: Touch) -> Result:
    """One entry, judged the same way whichever view (``problem``, ``owner``, ``field``,
    ``member``) of a vLLM resolves it: imported, or read from its sources."""
    if problem := view.problem(entry.module):
        return Result(entry, *problem)
    owner_name, _, attr = entry.name.rpartition(".")
    owner = view.owner(entry.module, owner_name)
    if owner is None:
        return Result(entry, "missing", f"no class {owner_name} in {entry.module}")
    if entry.kind == "field":
        return Result(entry, "ok") if view.field(owner, attr) else Result(
            entry, "missing", f"{owner_name} declares no {attr}")
    found = view.member(owner, attr)
    if found is None:
        return Result(entry, "missing", f"no {attr} in {owner_name or entry.module}")
    if entry.kind == "class" or not isinstance(found, tuple):
        if found == "assigned" or found == "class" == entry.kind:
            return Result(entry, "ok", "assigned, not inspected" if found == "assigned" else "")
        return Result(entry, "kind", f"not a {entry.kind}")
    names, var_kw, positional = found
    if (lacking := [p for p in entry.params if p not in names]) and not var_kw:
        return Result(entry, "params", f"lacks {', '.join(lacking)}; has ({', '.join(names)})")
    # Overrides forward what they receive positionally: a reordering breaks them too.
    order = [names.index(p) for p in entry.params if p in names[:positional]]
    if order != sorted(order):
        return Result(entry, "params", f"reordered; has ({', '.join(names)})")
    return Result(entry, "ok")


def _run(view: _Installed | Sources, surface: list[Touch], v1_present: bool) -> list[Result]:
    results = [_check(view, t) for t in surface]
    # The V1 adapter's entries cannot fail where vLLM no longer builds a V1 runner.
    return results if v1_present else [
        Result(r.entry, "runner-removed", f"{V1_RUNNER} absent; this entry: {r.status} "
               f"{r.detail}".rstrip()) if r.entry.runner == "v1" else r for r in results]


def _stored(node: ast.AST) -> list[ast.expr]:
    """Names and attributes ``node`` assigns to (``self.a, self.b = ...`` included)."""
    return [n for n in ast.walk(node) if isinstance(getattr(n, "ctx", None), ast.Store)]


def _class_names(cls: ast.ClassDef) -> set[str]:
    """Names a class body declares, plus every ``self.<name>`` its methods assign."""
    names = set()
    for node in cls.body:
        if isinstance(node, _DEFS):
            names.add(node.name)  # methods and properties
            names.update(t.attr for t in _stored(node) if isinstance(t, ast.Attribute)
                         and isinstance(t.value, ast.Name) and t.value.id == "self")
        else:
            names.update(t.id for t in _stored(node) if isinstance(t, ast.Name))
    return names


# -- installed vLLM ---------------------------------------------------------------------
class _Installed:
    """The vLLM this interpreter imports."""

    def problem(self, module: str) -> tuple[str, str] | None:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name and (module + ".").startswith(exc.name + "."):
                return "missing-module", str(exc)
            return "import-error", repr(exc)  # it exists but needs something absent here
        except Exception as exc:  # noqa: BLE001 - any import failure is this entry's result
            return "import-error", repr(exc)
        return None

    def owner(self, module: str, name: str) -> Any:
        imported = importlib.import_module(module)
        return getattr(imported, name, None) if name else imported

    def field(self, owner: Any, name: str) -> bool:
        if hasattr(owner, name):  # class attribute, property, enum member, field with a default
            return True
        mro = getattr(owner, "__mro__", (owner,))
        if any(name in vars(k).get("__annotations__", {}) for k in mro):
            return True
        for k in (k for k in mro if k.__module__.partition(".")[0] == "vllm"):  # as ast does
            try:  # instance attributes exist only once __init__ (or another method) ran
                tree = ast.parse(textwrap.dedent(inspect.getsource(k)))
            except (OSError, TypeError, SyntaxError):  # classes made at run time
                continue
            if name in _class_names(next(n for n in tree.body if isinstance(n, ast.ClassDef))):
                return True
        return False

    def member(self, owner: Any, name: str) -> Member | None:
        target = getattr(owner, name, None)
        if target is None or inspect.isclass(target) or not callable(target):
            return None if target is None else "class" if inspect.isclass(target) else "value"
        every = inspect.signature(target).parameters.values()
        named = [p for p in every if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        return ([p.name for p in named], any(p.kind is p.VAR_KEYWORD for p in every),
                sum(p.kind is not p.KEYWORD_ONLY for p in named))


def check_installed(surface: list[Touch] = SURFACE) -> list[Result]:
    """Check each entry against the vLLM this interpreter imports."""
    view = _Installed()
    return _run(view, surface, (view.problem(V1_RUNNER) or ("",))[0] != "missing-module")


# -- sources, read statically -----------------------------------------------------------
class Sources:
    """``vllm/**/*.py`` of a wheel (read from the zip) or of a directory holding ``vllm/``.

    An owner is a module's name, or a class's [(module, ClassDef)] with its vLLM bases
    after it, depth first (a simple MRO)."""

    def __init__(self, root: Path | str) -> None:
        root = Path(root)
        self._files: dict[str, str | Path]
        if root.is_file():
            with zipfile.ZipFile(root) as wheel:
                self._files = {n: wheel.read(n).decode() for n in wheel.namelist()
                               if n.startswith("vllm/") and n.endswith(".py")}
        else:
            base = root.parent if root.name == "vllm" and not (root / "vllm").is_dir() else root
            self._files = {p.relative_to(base).as_posix(): p for p in base.glob("vllm/**/*.py")}
        self._trees: dict[str, ast.Module | None] = {}

    def _path(self, dotted: str) -> str | None:
        path = dotted.replace(".", "/")
        return next((p for p in (f"{path}.py", f"{path}/__init__.py") if p in self._files), None)

    def module(self, dotted: str) -> ast.Module | None:
        if dotted not in self._trees:
            text = self._files.get(self._path(dotted) or "")
            text = text.read_text() if isinstance(text, Path) else text
            self._trees[dotted] = None if text is None else ast.parse(text)
        return self._trees[dotted]

    def lookup(self, dotted: str, name: str, depth: int = 0) -> tuple[str, ast.AST] | None:
        """Where ``name`` is defined, following ``from x import name`` into other vLLM modules."""
        tree = self.module(dotted)
        stack = list(tree.body) if tree is not None and depth < 10 else []
        while stack:  # the top level, with what if/try/with blocks hold
            node = stack.pop(0)
            if isinstance(node, (ast.ClassDef, *_DEFS)):
                if node.name == name:
                    return dotted, node
            elif isinstance(node, ast.ImportFrom):
                # Relative imports start at a package, or at a plain module's parent.
                package = dotted.split(".")[
                    : None if (self._path(dotted) or "").endswith("__init__.py") else -1]
                package = package[: len(package) - node.level + 1] if node.level else []
                source = ".".join([*package, *([node.module] if node.module else [])])
                for alias in node.names:
                    if (alias.asname or alias.name) == name and (
                            found := self.lookup(source, alias.name, depth + 1)):
                        return found
            elif isinstance(node, (ast.Assign, ast.AnnAssign)) and any(
                    isinstance(t, ast.Name) and t.id == name for t in _stored(node)):
                return dotted, node
            elif isinstance(node, (ast.If, ast.Try, ast.With)):
                stack[:0] = [*node.body, *(s for h in getattr(node, "handlers", []) for s in h.body),
                             *getattr(node, "orelse", []), *getattr(node, "finalbody", [])]
        return None

    def _classes(self, dotted: str, cls: ast.ClassDef, seen: set) -> list[tuple[str, ast.ClassDef]]:
        if (dotted, cls.name) in seen:
            return []
        seen.add((dotted, cls.name))
        chain = [(dotted, cls)]
        for base in cls.bases:
            base = base.value if isinstance(base, ast.Subscript) else base  # Generic[T]
            found = self.lookup(dotted, base.id) if isinstance(base, ast.Name) else None
            if found and isinstance(found[1], ast.ClassDef):
                chain += self._classes(*found, seen)
        return chain

    def problem(self, module: str) -> tuple[str, str] | None:
        path = module.replace(".", "/")
        return None if self.module(module) else ("missing-module", f"no {path}.py")

    def owner(self, module: str, name: str) -> Any:
        if not name:
            return module
        found = self.lookup(module, name)
        return self._classes(*found, set()) if found and isinstance(found[1], ast.ClassDef) \
            else None

    def field(self, owner: Any, name: str) -> bool:
        return any(name in _class_names(cls) for _, cls in owner)

    def member(self, owner: Any, name: str) -> Member | None:
        if isinstance(owner, str):  # a module
            node = (self.lookup(owner, name) or (None, None))[1]
        else:  # the last definition in the first class that has one
            node = next((defs[-1] for _, cls in owner if (defs := [
                n for n in cls.body if isinstance(n, _DEFS) and n.name == name])), None)
        if node is None or not isinstance(node, _DEFS):
            return None if node is None else "class" if isinstance(node, ast.ClassDef) \
                else "assigned"
        a = node.args
        return ([p.arg for p in (*a.posonlyargs, *a.args, *a.kwonlyargs)], a.kwarg is not None,
                len(a.posonlyargs) + len(a.args))


def check_sources(root: Path | str, surface: list[Touch] = SURFACE) -> list[Result]:
    """Check each entry against the vLLM sources in ``root`` (a directory or a wheel)."""
    src = Sources(root)
    return _run(src, surface, src.module(V1_RUNNER) is not None)


# -- command line -----------------------------------------------------------------------
def fetch_wheel(version: str, cache: Path = CACHE_DIR) -> Path:
    """vLLM's PyPI wheel of ``version``, downloaded once into ``cache``."""
    if not list(cache.glob(f"vllm-{version}-*.whl")):
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", f"vllm=={version}", "--no-deps",
                        "--only-binary=:all:", "-d", str(cache)], check=True)
    return min(cache.glob(f"vllm-{version}-*.whl"))


def table(runs: dict[str, list[Result]]) -> str:
    """Entry x version (ok or what is wrong), then per version a count and each failure."""
    rows = [["entry", *runs]] + [[r.entry.qualname.removeprefix("vllm."), *(
        f"params: {rs[i].detail.split(';')[0]}" if rs[i].status == "params" else rs[i].status
        for rs in runs.values())] for i, r in enumerate(next(iter(runs.values())))]
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for label, results in runs.items():
        counts = Counter(r.status for r in results)
        lines.append(f"{label}: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
        lines += [f"  FAIL {r.entry.qualname}: {r.status} {r.detail}" for r in results if r.failed]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="python -m vllm_kvcompress.contract",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--installed", action="store_true",
                        help="check the installed vLLM (the default when nothing else is named)")
    parser.add_argument("--wheel", nargs="+", default=[], type=Path, metavar="PATH",
                        help="vLLM wheels or source trees to read")
    parser.add_argument("--vllm", nargs="+", default=[], metavar="VERSION",
                        help=f"vLLM releases: their PyPI wheels, downloaded once into {CACHE_DIR}")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the results here")
    args = parser.parse_args(argv)
    runs: dict[str, list[Result]] = {}
    sources: dict[str, str] = {}
    if args.installed or not (args.wheel or args.vllm):
        import vllm

        label = f"installed {vllm.__version__}"
        runs[label], sources[label] = check_installed(), str(Path(vllm.__file__).parent)
    for wheel in [*args.wheel, *map(fetch_wheel, args.vllm)]:
        # A wheel is labelled by its version (vllm-0.33.0-cp38-abi3-....whl), a tree by its path.
        label = wheel.name.split("-")[1] if wheel.suffix == ".whl" else str(wheel)
        runs[label], sources[label] = check_sources(wheel), wheel.name
    print(table(runs))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "title": "vLLM internals the plugin relies on (vllm/surface.py), per vLLM version",
            "command": shlex.join(["python", "-m", "vllm_kvcompress.contract", *argv]),
            "date": datetime.date.today().isoformat(),
            "vllm_versions": list(runs), "sources": sources,
            "summary": {k: dict(Counter(r.status for r in v)) for k, v in runs.items()},
            "entries": [{"entry": t.qualname, "kind": t.kind, "params": list(t.params),
                         "runner": t.runner, "why": t.why,
                         "results": {k: {"status": v[i].status, "detail": v[i].detail}
                                     for k, v in runs.items()}}
                        for i, t in enumerate(SURFACE)],
        }, indent=1) + "\n")
    return 1 if any(r.failed for results in runs.values() for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
