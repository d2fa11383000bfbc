"""vllm-kvcompress: a compressed, paged KV cache for vLLM.

Layers, highest first; each imports only its own and those below it
(``tests/test_layers.py`` holds it so):

    vllm/          adapters to vLLM: plugin, CLI flags, model-runner adapters over one seam
                   (runners/), scheduler, attention backend, metrics; surface.py lists the
                   vLLM internals they touch (beside it: cli.py, models.py, contract.py)
    config.py      typed options (flags, YAML presets, additional_config, per-request options)
    compressor.py  one layer of one step: write, attend, compress, evict
    decode/        how decode attention reads the pages: one reader a mechanism
    paging/        page pool, per-(request, layer, KV head) tables, accounting
    policies/      what to keep: pure torch math, one file a method, and what each needs
    kernels/       attention over pages: the torch paths, the C++ CPU kernel, Triton kernels
    paging/formats.py  page formats (K8V8, K8V4, K4V4): encode and decode
"""

__version__ = "0.1.0"
