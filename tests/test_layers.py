"""The package's layers import only downwards, as ``vllm_kvcompress/__init__.py`` draws them."""

from __future__ import annotations

import ast
from pathlib import Path

import vllm_kvcompress

PACKAGE = Path(vllm_kvcompress.__file__).parent
# Lowest first; a module may import its own layer and those below it. Longest prefix wins.
LAYERS = [
    ("paging.formats",),
    ("kernels",),
    ("policies",),
    ("paging",),
    ("decode",),
    ("compressor",),
    ("config",),
    ("vllm", "contract", "models", "cli"),
]


def layer_of(module: str) -> int | None:
    """Layer of ``vllm_kvcompress.<module>`` (dotted), by the longest matching prefix."""
    best = None
    for rank, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            matches = module == prefix or module.startswith(prefix + ".")
            if matches and (best is None or len(prefix) > best[1]):
                best = (rank, len(prefix))
    return None if best is None else best[0]


def imports(path: Path) -> set[str]:
    """Every vllm_kvcompress module ``path`` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found.update(n.removeprefix("vllm_kvcompress.") for n in names
                     if n.startswith("vllm_kvcompress."))
    return found


def test_every_module_imports_only_its_layer_and_below():
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        own = layer_of(module)
        if own is None:
            continue
        for target in imports(path):
            rank = layer_of(target)
            if rank is not None and rank > own:
                problems.append(f"{module} imports {target}")
    assert not problems, "imports against the layer order:\n" + "\n".join(problems)


def test_every_package_module_has_a_layer():
    unplaced = [p.name for p in PACKAGE.iterdir()
                if (p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists()))
                and p.stem != "__init__" and layer_of(p.stem) is None]
    assert not unplaced, f"place {unplaced} in LAYERS and in the package docstring"
