"""vllm-kvcompress: a compressed, paged KV cache for vLLM.

Layers (imports point downward only):

    config.py      typed options (flags, YAML presets, additional_config)
    vllm/          thin adapters: plugin, CLI flags, scheduler, worker, attention backend
    compressor.py  one layer of one step: write, attend, compress, evict
    paging/        page pool, per-(request, layer, KV head) page tables, accounting
    policies/      what to keep: pure torch math, one file a method
    kernels/       attention over pages (torch reference; Triton on GPU)
"""

__version__ = "0.1.0"
