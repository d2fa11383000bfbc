"""Time of one decode step of one layer against context length, batch and page format.

    python -m benchmarks.kernels [--contexts 1024 4096 16384] [--batches 1 4] \\
        [--formats none k8v4] [--kv-heads 8 --group 4 --head-dim 128] [--peak-gbps 3350]

Every request holds ``context`` tokens in each KV head, in pages of
``--page-size`` shuffled across the pool as a serving pool would leave them.

* On CUDA: the Triton kernel (``kernels.triton.paged_decode``) over the pages of
  each format (``none`` is the dense bf16 paged decode), against torch SDPA over a
  contiguous bf16 cache of the same tokens. Bandwidth is the bytes the step must
  read (pages, scales, query) over its time, also as a fraction of ``--peak-gbps``
  (H100 SXM: 3350 GB/s); times from ``triton.testing.do_bench`` (L2 flushed).
* On CPU: the C++ kernel serving runs (``kernels.cpu.paged_decode``, pages read
  in place) and the torch path it replaces (``PagedKVStore.gather`` of the rows' pages
  into its scratch buffers, dequantized, then ``decode_attention``) against vLLM's own CPU attention op
  (``cpu_attention_with_kv_cache``, called directly on a cache of 128-token blocks
  filled by its ``cpu_attn_reshape_and_cache``) and torch SDPA over the same tokens.
  The model dtype defaults to float32 there, as served on an AVX2 CPU.

Writes results/kernels.json and results/kernels.png.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.results import machine, save

from vllm_kvcompress.kernels.paged_attention import decode_attention
from vllm_kvcompress.paging.formats import FORMAT_NAMES, encode, page_format
from vllm_kvcompress.paging.store import PagedKVStore, StoreShape

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
VLLM_BLOCK = 128  # vLLM's default KV block on CPU


def build_pages(fmt_name: str, rows: int, context: int, head_dim: int, page_size: int,
                dtype: torch.dtype, device: str, gen: torch.Generator):
    """Encoded random pages for ``rows`` rows of ``context`` tokens, and their shuffled table."""
    fmt = page_format(fmt_name)
    per_row = -(-context // page_size)
    num_pages = rows * per_row
    parts = {name: torch.empty((num_pages, page_size, *shape), dtype=dt, device=device)
             for name, (shape, dt) in fmt.components(head_dim, dtype).items()}
    chunk = max(1, (1 << 24) // (page_size * head_dim))  # bounded fp32 temporaries
    for start in range(0, num_pages, chunk):
        end = min(num_pages, start + chunk)
        for side in ("k", "v"):
            x = torch.randn(end - start, page_size, head_dim, generator=gen).to(device, dtype)
            for name, part in encode(fmt, side, x).items():
                parts[name][start:end] = part
    table = torch.randperm(num_pages, generator=gen).view(rows, per_row).to(torch.int32)
    return fmt, parts, table.to(device)


def serving_torch_path(q, parts, fmt, table, lens, scale, max_len):
    """The compressor's CPU decode: a scratch gather from the store, then ``decode_attention``.

    Same signature as ``paged_decode``; the store is built around the given pages
    once per shape (cached on the table tensor's identity).
    """
    batch, _, head_dim = q.shape
    rows, width = table.shape
    store = _STORES.get(id(table), (None, None))[1]
    if store is None:
        page_size = next(iter(parts.values())).shape[1]
        shape = StoreShape(1, rows // batch, head_dim, page_size, q.dtype, fmt)
        store = PagedKVStore(shape, 1, batch, width * page_size)
        store.parts.update(parts)  # the benchmark's pages, not the store's own single page
        store.tables[0, :, :width] = table
        store.lens[0] = max_len
        _STORES.clear()
        _STORES[id(table)] = (table, store)  # holding the table: its id cannot be reused
    keys, values = store.gather(0, np.arange(rows), scratch=True)
    out, _ = decode_attention(q, keys.view(batch, rows // batch, -1, head_dim),
                              values.view(batch, rows // batch, -1, head_dim),
                              lens.view(batch, -1), scale)
    return out


_STORES: dict = {}


def time_ms(fn, device: str, reps: int) -> float:
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()  # warm-up
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        samples.append(1e3 * (time.perf_counter() - start))
    return statistics.median(samples)


def sdpa_step(batch: int, heads: int, group: int, context: int, head_dim: int,
              dtype: torch.dtype, device: str, gen: torch.Generator):
    """Dense decode over a contiguous cache: query heads share their KV head (enable_gqa)."""
    q = torch.randn(batch, heads * group, 1, head_dim, generator=gen).to(device, dtype)
    k = torch.randn(batch, heads, context, head_dim, generator=gen).to(device, dtype)
    v = torch.randn(batch, heads, context, head_dim, generator=gen).to(device, dtype)
    return lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)


def vllm_cpu_step(batch: int, heads: int, group: int, context: int, head_dim: int,
                  dtype: torch.dtype, gen: torch.Generator):
    """vLLM's CPU decode attention over blocks of 128 tokens; raises if vLLM cannot load."""
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")  # else it may pick AVX-512 kernels
    from vllm_kvcompress.cli import _ensure_vllm_version

    _ensure_vllm_version()
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    isa = _get_attn_isa(dtype, VLLM_BLOCK, head_dim)
    per_row = -(-context // VLLM_BLOCK)
    cache = torch.zeros(batch * per_row, heads, VLLM_BLOCK, 2 * head_dim, dtype=dtype)
    # The backend's own views: [blocks, H, 2 * block, D] split into keys and values.
    key_cache, value_cache = cache.view(batch * per_row, heads, 2 * VLLM_BLOCK, -1).chunk(2, dim=2)
    table = torch.randperm(batch * per_row, generator=gen).view(batch, per_row).to(torch.int32)
    for b in range(batch):  # its own packing: the op reads blocks in an ISA-specific layout
        slots = (table[b].long()[:, None] * VLLM_BLOCK + torch.arange(VLLM_BLOCK)).flatten()
        kv = torch.randn(2, context, heads, head_dim, generator=gen).to(dtype)
        ops.cpu_attn_reshape_and_cache(kv[0], kv[1], key_cache, value_cache,
                                       slots[:context], isa)
    q = torch.randn(batch, heads * group, head_dim, generator=gen).to(dtype)
    out = torch.empty_like(q)
    starts = torch.arange(batch + 1, dtype=torch.int32)
    lens = torch.full((batch,), context, dtype=torch.int32)
    meta = ops.cpu_attn_get_scheduler_metadata(batch, heads * group, heads, head_dim, lens, dtype,
                                               starts, True, -1, isa, True)
    scale = head_dim ** -0.5
    return lambda: ops.cpu_attention_with_kv_cache(
        q, key_cache, value_cache, out, starts, lens, scale, True, None, -1, table, 0.0, meta,
        None)


def run(args: argparse.Namespace) -> dict:
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    dtype = DTYPES[args.dtype or ("bfloat16" if device == "cuda" else "float32")]
    heads, group, head_dim = args.kv_heads, args.group, args.head_dim
    gen = torch.Generator().manual_seed(0)
    if device == "cuda":
        from vllm_kvcompress.kernels.triton import paged_decode

        paths = {"triton": paged_decode}
    else:
        from vllm_kvcompress.kernels import cpu

        paths = {"cpu-paged": cpu.paged_decode} if cpu.available() else {}
        paths["torch-paged"] = serving_torch_path
    rows_out, errors = [], {}
    for context in args.contexts:
        for batch in args.batches:
            rows = batch * heads
            q = torch.randn(batch, heads * group, head_dim, generator=gen).to(device, dtype)
            lens = torch.full((rows,), context, device=device)
            dense_bytes = rows * context * 2 * head_dim * dtype.itemsize
            q_bytes = 2 * q.numel() * dtype.itemsize  # query in, output out
            entry = {"context": context, "batch": batch}
            baselines = {"sdpa": lambda: sdpa_step(batch, heads, group, context, head_dim,
                                                   dtype, device, gen)}
            if device == "cpu":
                baselines["vllm-cpu"] = lambda: vllm_cpu_step(batch, heads, group, context,
                                                              head_dim, dtype, gen)
            for name, build in baselines.items():
                try:
                    step = build()
                except Exception as error:  # noqa: BLE001  vLLM may not load here: say why
                    errors[name] = f"{type(error).__name__}: {error}"
                    continue
                entry[name] = time_ms(step, device, args.reps)
                del step
            for fmt_name in args.formats:
                fmt, parts, table = build_pages(fmt_name, rows, context, head_dim,
                                                args.page_size, dtype, device, gen)
                for ours, paged in paths.items():
                    ms = time_ms(lambda: paged(q, parts, fmt, table, lens, head_dim ** -0.5,
                                               max_len=context), device, args.reps)
                    read = rows * context * fmt.slot_bytes(head_dim, dtype) + q_bytes
                    result = {"ms": ms, "bytes": read, "gbps": read / ms / 1e6}
                    if device == "cuda":
                        result["fraction_of_peak"] = result["gbps"] / args.peak_gbps
                    for name in baselines:
                        if name in entry:
                            result[f"speedup_vs_{name}"] = entry[name] / ms
                    entry[f"{ours}-{fmt_name}"] = result
                del parts, table
            for name in baselines:
                if name in entry:
                    ms = entry[name]
                    entry[name] = {"ms": ms, "bytes": dense_bytes + q_bytes,
                                   "gbps": (dense_bytes + q_bytes) / ms / 1e6}
            rows_out.append(entry)
            print(summary_line(entry), flush=True)
    return {"device": torch.cuda.get_device_name() if device == "cuda" else machine(),
            "threads": torch.get_num_threads(), "dtype": str(dtype).removeprefix("torch."),
            "kv_heads": heads, "group": group, "head_dim": head_dim, "page_size": args.page_size,
            "peak_gbps": args.peak_gbps if device == "cuda" else None,
            "rows": rows_out, "errors": errors}


def summary_line(entry: dict) -> str:
    parts = [f"ctx {entry['context']:>6} batch {entry['batch']:>2}:"]
    for name, r in entry.items():
        if isinstance(r, dict):
            parts.append(f"{name} {r['ms']:.3f} ms ({r['gbps']:.2f} GB/s)")
    return "  ".join(parts)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in result["rows"]})
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        rows = [r for r in result["rows"] if r["batch"] == batch]
        names = [n for n in rows[0] if isinstance(rows[0][n], dict)]
        for name in names:
            ax.plot([r["context"] for r in rows], [r[name]["ms"] for r in rows], marker="o",
                    label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens per KV head)")
        ax.set_ylabel("ms per decode step (one layer)")
        ax.set_title(f"batch {batch}")
        ax.legend(fontsize=8)
    fig.suptitle(f"{result['device']}, {result['dtype']}, {result['kv_heads']} KV heads x "
                 f"{result['group']}, head_dim {result['head_dim']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+",
                        default=[1024, 4096, 16384, 32768, 65536, 131072])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--formats", nargs="+", default=list(FORMAT_NAMES), choices=FORMAT_NAMES)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--group", type=int, default=4, help="query heads per KV head")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--dtype", choices=sorted(DTYPES),
                        help="model dtype (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--peak-gbps", type=float, default=3350.0,
                        help="the device's memory bandwidth (default: H100 SXM)")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions on CPU")
    parser.add_argument("--cpu", action="store_true", help="the CPU path even with a GPU")
    parser.add_argument("--out", type=Path, default=Path("results/kernels.json"))
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    result = {"command": shlex.join(["python", "-m", "benchmarks.kernels", *argv]), **run(args)}
    save(result, args.out, plot)
    return result


if __name__ == "__main__":
    main()
