"""vllm-kvcompress: a compressed, paged KV cache for vLLM.

Layers (each imports only the ones below it):

    vllm/          adapters to vLLM: plugin, CLI flags, model-runner adapters over one seam
                   (runners/), scheduler, attention backend, metrics; surface.py lists the
                   vLLM internals they touch
    config.py      typed options (flags, YAML presets, additional_config, per-request options)
    compressor.py  one layer of one step: write, attend, compress, evict
    kernels/       attention over pages: the torch paths, the C++ CPU kernel, Triton kernels
    paging/        page formats, page pool, per-(request, layer, KV head) tables, accounting
    policies/      what to keep: pure torch math, one file a method, and what each needs
"""

__version__ = "0.1.0"
