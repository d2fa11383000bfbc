"""Configuration names the benchmarks take, turned into ``vllm serve`` flags.

``plain`` (and ``plain-ample``, the throughput ceiling) is vLLM alone; ``ours-full`` the
plugin keeping everything; ``k8v8`` / ``k8v4`` / ``k4v4`` our page formats alone;
``vllm-<dtype>`` vLLM's own KV dtypes; and ``POLICY@BUDGET`` with optional parts
``+k8v4`` (a page format) and ``+everyN`` (decode-time compression every N tokens), e.g.
``snapkv@64+every16`` or ``pyramidkv@0.25+k8v4``.
"""

from __future__ import annotations

import argparse
import re

from vllm_kvcompress.paging.formats import FORMAT_NAMES
from vllm_kvcompress.config import kv_policy_names

VLLM_DTYPES = {"bf16": "bfloat16", "fp8": "fp8", "int8": "int8_per_token_head",
               "int4": "int4_per_token_head", "turboquant-k8v4": "turboquant_k8v4"}
_POLICY = re.compile(r"(?P<policy>[a-z_0-9]+)@(?P<budget>[0-9.]+)(?P<parts>(\+[a-z0-9]+)*)$")


def serve_flags(name: str) -> tuple[str, ...]:
    """The flags of configuration ``name``; ValueError naming the forms it takes."""
    if name in ("plain", "plain-ample"):
        return ()
    if name == "ours-full":
        return ("--kv-policy", "snapkv", "--kv-budget", "1.0")
    if name in FORMAT_NAMES and name != "none":
        return ("--kv-quant", name)
    if name.startswith("vllm-") and name[5:] in VLLM_DTYPES:
        return ("--kv-cache-dtype", VLLM_DTYPES[name[5:]])
    match = _POLICY.match(name)
    if match is None or match["policy"] not in kv_policy_names():
        raise ValueError(f"{name!r}: expected plain, plain-ample, ours-full, a page format, "
                         f"vllm-{{{','.join(VLLM_DTYPES)}}} or POLICY@BUDGET[+FORMAT][+everyN]")
    flags = ["--kv-policy", match["policy"], "--kv-budget", match["budget"]]
    for part in filter(None, match["parts"].split("+")):
        if part in FORMAT_NAMES:
            flags += ["--kv-quant", part]
        elif re.fullmatch(r"every\d+", part):
            flags += ["--kv-decode-every", part[5:]]
        else:
            raise ValueError(f"{name!r}: {part!r} is neither a page format nor everyN")
    return tuple(flags)


def config_name(text: str) -> str:
    """argparse type: a configuration name that :func:`serve_flags` takes."""
    try:
        serve_flags(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text
