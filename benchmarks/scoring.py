"""Time spent choosing what to keep, per prompt: ChunkKV's layer-wise index reuse.

    python -m benchmarks.scoring [--tokens 4096] [--repeats 3]

Compresses one prompt through the compressor (no vLLM, random activations of
the default model's shape: 30 layers, 9 query / 3 KV heads, head_dim 64) and
times the selection of every layer: scoring plus top-k, or the reuse of an
earlier layer's indices. Writes results/scoring.json.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from benchmarks.results import save

from vllm_kvcompress.compressor import KVCompressor, metadata_for
from vllm_kvcompress.paging.formats import page_format
from vllm_kvcompress.paging.step import StepRequest
from vllm_kvcompress.paging.store import PagedKVStore, StoreShape
from vllm_kvcompress.policies import build_policy

LAYERS, KV_HEADS, Q_HEADS, DIM = 30, 3, 9, 64
SETTINGS = {
    "snapkv": {},
    "chunkkv reuse 1": {"reuse_layers": 1},
    "chunkkv reuse 2": {"reuse_layers": 2},
    "chunkkv reuse 3": {"reuse_layers": 3},
    "chunkkv reuse 5": {"reuse_layers": 5},
}


def selection_seconds(name: str, kwargs: dict, tokens: int) -> float:
    policy = build_policy(name.split()[0], budget=0.25, **kwargs)
    shape = StoreShape(LAYERS, KV_HEADS, DIM, 16, torch.float32, page_format("none"),
                       metadata_for(policy))
    comp = KVCompressor(PagedKVStore(shape, LAYERS * KV_HEADS * (tokens // 16 + 2), 1, tokens),
                        policy, Q_HEADS)
    spent = 0.0
    select = comp._select

    def timed(*args):
        nonlocal spent
        start = time.perf_counter()
        keep = select(*args)
        spent += time.perf_counter() - start
        return keep

    comp._select = timed
    gen = torch.Generator().manual_seed(0)
    comp.begin_step([StepRequest("r", 0, tokens, tokens)])
    for layer in range(LAYERS):
        q = torch.randn(tokens, Q_HEADS, DIM, generator=gen)
        k = torch.randn(tokens, KV_HEADS, DIM, generator=gen)
        comp.forward_layer(layer, q, k, torch.randn_like(k), DIM ** -0.5)
    comp.end_step()
    return spent


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("results/scoring.json"))
    args = parser.parse_args(argv)
    rows = {}
    for name, kwargs in SETTINGS.items():
        samples = [selection_seconds(name, kwargs, args.tokens) for _ in range(args.repeats)]
        rows[name] = {"seconds": round(sorted(samples)[len(samples) // 2], 4),  # median
                      "samples": [round(s, 4) for s in samples]}
    base = rows["chunkkv reuse 1"]["seconds"]
    for name, row in rows.items():
        row["vs_chunkkv_no_reuse"] = round(row["seconds"] / base, 3)
        print(f"{name:18} {1000 * row['seconds']:8.1f} ms per prompt (median)  "
              f"({row['vs_chunkkv_no_reuse']:.2f}x)  samples {row['samples']}")
    result = {"tokens": args.tokens, "layers": LAYERS, "threads": torch.get_num_threads(),
              "rows": rows}
    save(result, args.out)
    return result


if __name__ == "__main__":
    main()
