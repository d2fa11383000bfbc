"""Model-runner adapters: one per vLLM runner, all over one seam (``session.py``).

:func:`adopt` gives the runner vLLM built the adapter of its kind, or refuses
at start-up naming the runner: an unknown runner is never served silently.
"""

from __future__ import annotations

from vllm_kvcompress.vllm.runners.session import KVCompressSession, Unsupported


def runner_kinds() -> dict[str, type]:
    """The runner classes this vLLM ships, by adapter name (``v1`` is gone in vLLM 0.34)."""
    kinds = {}
    try:
        from vllm.v1.worker.gpu.model_runner import GPUModelRunner as V2Runner

        kinds["v2"] = V2Runner
    except ImportError:
        pass
    try:
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner as V1Runner

        kinds["v1"] = V1Runner
    except ImportError:
        pass
    return kinds


def kind_of(runner_cls: type) -> str | None:
    """``"v1"``, ``"v2"`` or ``None`` (a runner the plugin has no adapter for)."""
    for kind, base in runner_kinds().items():
        if issubclass(runner_cls, base):
            return kind
    return None


def adapter_for(kind: str) -> type:
    if kind == "v1":
        from vllm_kvcompress.vllm.runners.v1 import V1RunnerAdapter

        return V1RunnerAdapter
    from vllm_kvcompress.vllm.runners.v2 import V2RunnerAdapter

    return V2RunnerAdapter


def dead_hooks(kind: str, runner_cls: type) -> list[str]:
    """The adapter's overrides that ``runner_cls`` does not define: hooks vLLM would never call."""
    return [name for name in adapter_for(kind).hooks() if not hasattr(runner_cls, name)]


def adopt(runner) -> KVCompressSession:
    """Give an existing vLLM model runner the adapter of its kind (idempotent)."""
    session = getattr(runner, "kvcompress", None)
    if isinstance(session, KVCompressSession):
        return session
    base = type(runner)
    kind = kind_of(base)
    if kind is None:
        raise Unsupported(f"vLLM built a {base.__module__}.{base.__qualname__} model runner, "
                          "which the plugin has no adapter for")
    if dead := dead_hooks(kind, base):
        raise Unsupported(f"this vLLM's {kind} model runner ({base.__qualname__}) has no "
                          f"{', '.join(dead)}, which the plugin hooks")
    runner.__class__ = type(f"KVCompress{base.__name__}", (adapter_for(kind), base), {})
    runner.kvcompress = KVCompressSession(runner.vllm_config, runner.device, kind)
    return runner.kvcompress


__all__ = ["KVCompressSession", "Unsupported", "adopt", "dead_hooks", "kind_of", "runner_kinds"]
