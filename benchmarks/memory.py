"""Bytes per stored token for every page format, against the unquantized cache.

    python -m benchmarks.memory [--head-dim 64] [--layers 30] [--kv-heads 3]

Counts everything a token costs in the page pool: codes, per-token scales and
the slot metadata a policy keeps (positions for decode-capped policies,
attention mass for H2O). Writes results/memory.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from benchmarks.results import save

from vllm_kvcompress.compressor import metadata_for
from vllm_kvcompress.paging.formats import FORMAT_NAMES, page_format
from vllm_kvcompress.paging.store import StoreShape
from vllm_kvcompress.policies import build_policy

POLICIES = ("none", "snapkv", "streamingllm", "h2o")


def slot_bytes(fmt: str, policy: str, head_dim: int, dtype: torch.dtype) -> int:
    meta = metadata_for(None if policy == "none" else build_policy(policy))
    return StoreShape(1, 1, head_dim, 16, dtype, page_format(fmt), meta).slot_bytes


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("results/memory.json"))
    args = parser.parse_args(argv)

    per_token = args.layers * args.kv_heads
    rows = []
    for fmt in FORMAT_NAMES:
        for policy in POLICIES:
            entry = {"format": fmt, "policy": policy}
            for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
                size = slot_bytes(fmt, policy, args.head_dim, dtype)
                base = slot_bytes("none", "none", args.head_dim, dtype)
                entry[f"token_head_bytes_{name}"] = size
                entry[f"token_bytes_{name}"] = size * per_token
                entry[f"vs_{name}"] = round(size / base, 4)
            rows.append(entry)

    print(f"bytes per stored token (head_dim {args.head_dim}; a token = {args.layers} layers x "
          f"{args.kv_heads} KV heads), scales and slot metadata included")
    print(f"{'format':8} {'policy':13} {'token-head':>10} {'token':>8} {'vs bf16':>8} {'vs fp32':>8}")
    for r in rows:
        print(f"{r['format']:8} {r['policy']:13} {r['token_head_bytes_bf16']:>10} "
              f"{r['token_bytes_bf16']:>8} {r['vs_bf16']:>8.3f} {r['vs_fp32']:>8.3f}")
    result = {"head_dim": args.head_dim, "layers": args.layers, "kv_heads": args.kv_heads,
              "rows": rows}
    save(result, args.out)
    return result


if __name__ == "__main__":
    main()
