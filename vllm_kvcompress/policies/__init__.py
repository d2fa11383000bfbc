"""Compression policies: pure torch math, one file a method, a registry by name.

Nothing in this package imports vLLM, so every policy can be tested alone.
"""

from __future__ import annotations

from typing import Any

from vllm_kvcompress.policies.base import LayerInputs, Policy, resolve_budget

_REGISTRY: dict[str, type[Policy]] = {}


def register(cls: type[Policy]) -> type[Policy]:
    """Class decorator: make a policy available under ``cls.name``."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"policy name {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def policy_names() -> list[str]:
    """Names accepted by ``--kv-policy`` (``none`` is plain vLLM)."""
    _load_builtin()
    return ["none", *sorted(_REGISTRY)]


def policy_class(name: str) -> type[Policy] | None:
    """The class registered as ``name`` (``None`` for ``none``, plain vLLM)."""
    _load_builtin()
    if name == "none":
        return None
    if name not in _REGISTRY:
        raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(policy_names())}")
    return _REGISTRY[name]


def build_policy(name: str, **kwargs: Any) -> Policy:
    """Instantiate a registered policy; raises ValueError naming the choices."""
    _load_builtin()
    if name not in _REGISTRY:
        raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(policy_names())}")
    return _REGISTRY[name](**kwargs)


def _load_builtin() -> None:
    # Imported lazily so that `register` exists before the method files use it.
    from vllm_kvcompress.policies import (  # noqa: F401
        adakv,
        chunkkv,
        expected_attention,
        h2o,
        keydiff,
        knorm,
        leankv,
        pod,
        pyramidkv,
        rkv,
        snapkv,
        spindlekv,
        streamingllm,
        tova,
    )


__all__ = ["LayerInputs", "Policy", "build_policy", "policy_class", "policy_names", "register",
           "resolve_budget"]
