"""Worker adapters: the plugin's attention backend, the runner adapter, the self-check.

The worker registers our attention backend before the model is built, gives
the model runner vLLM built the adapter of its kind (``runners/``), and runs
the start-up self-check once the KV space is handed over and before the
engine takes requests.
"""

from __future__ import annotations

from vllm.logger import init_logger

from vllm_kvcompress.vllm.runners import adopt
from vllm_kvcompress.vllm.runners.probe import self_check

logger = init_logger("vllm.kvcompress")

BACKEND = "vllm_kvcompress.vllm.attention.KVCompressAttentionBackend"


def register_attention_backend() -> None:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    # CPU ignores --attention-backend and always asks for CPU_ATTN; CUDA
    # selects CUSTOM (set by our engine-args hook).
    register_backend(AttentionBackendEnum.CPU_ATTN, BACKEND)
    register_backend(AttentionBackendEnum.CUSTOM, BACKEND)


def _worker_class(base):
    class Worker(base):
        def __init__(self, *args, **kwargs) -> None:
            register_attention_backend()
            super().__init__(*args, **kwargs)

        def init_device(self) -> None:
            super().init_device()
            adopt(self.model_runner)

        def compile_or_warm_up_model(self, *args, **kwargs):
            result = super().compile_or_warm_up_model(*args, **kwargs)
            session = self.model_runner.kvcompress
            self_check(self.model_runner, session)
            logger.info("kvcompress: start-up self-check passed on the %s model runner (%s): "
                        "a request went through the compressor in every layer",
                        session.runner_kind, type(self.model_runner).__mro__[2].__name__)
            return result

    Worker.__name__ = Worker.__qualname__ = f"KVCompress{base.__name__}"
    return Worker


def __getattr__(name: str):
    # Resolved by qualname in the worker process; import only the base in use.
    if name == "KVCompressCPUWorker":
        from vllm.v1.worker.cpu_worker import CPUWorker

        cls = _worker_class(CPUWorker)
    elif name == "KVCompressGPUWorker":
        from vllm.v1.worker.gpu_worker import Worker as GPUWorker

        cls = _worker_class(GPUWorker)
    else:
        raise AttributeError(name)
    globals()[name] = cls
    return cls
