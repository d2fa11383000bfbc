"""Lets vLLM build its Model Runner V2 on a CPU, with Triton's interpreter running its kernels.

vLLM turns Triton on for a CPU build only when Triton lists a ``cpu`` backend
whose driver is active; triton-cpu is not on PyPI. On ``PYTHONPATH`` this file
is imported by every Python process at start-up (API server, engine core,
workers) and, when ``KVCOMPRESS_V2_ON_CPU=1``, registers a stand-in backend
whose driver says it is active. With ``TRITON_INTERPRET=1`` the kernels then
run interpreted on CPU tensors: slow (about a second a decode step), for
correctness tests of the V2 path, not for measuring it. See
``benchmarks.server.runner_env``.
"""

import os

if os.environ.get("KVCOMPRESS_V2_ON_CPU") == "1":
    try:
        import triton.backends
    except ImportError:  # no Triton: vLLM keeps its V1 runner, and the tests say so
        pass
    else:
        class _ActiveDriver:
            @staticmethod
            def is_active() -> bool:
                return True

        class _InterpreterBackend:
            driver = _ActiveDriver

        triton.backends.backends.setdefault("cpu", _InterpreterBackend)
