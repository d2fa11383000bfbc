"""Every registered policy with a few hyperparameter settings; drives the smoke tests.

Add a line here when adding a policy: test_smoke checks that every name in
``policy_names()`` appears.
"""

from __future__ import annotations

from typing import Any

from vllm_kvcompress.policies.adakv import AdaKV
from vllm_kvcompress.policies.base import Policy
from vllm_kvcompress.policies.chunkkv import ChunkKV
from vllm_kvcompress.policies.expected_attention import ExpectedAttention
from vllm_kvcompress.policies.h2o import H2O
from vllm_kvcompress.policies.keydiff import KeyDiff
from vllm_kvcompress.policies.knorm import KNorm
from vllm_kvcompress.policies.leankv import LeanKV
from vllm_kvcompress.policies.pod import PoD
from vllm_kvcompress.policies.pyramidkv import PyramidKV
from vllm_kvcompress.policies.rkv import RKV
from vllm_kvcompress.policies.snapkv import SnapKV
from vllm_kvcompress.policies.spindlekv import SpindleKV
from vllm_kvcompress.policies.streamingllm import StreamingLLM
from vllm_kvcompress.policies.tova import TOVA

DEFAULT_POLICIES: list[tuple[type[Policy], dict[str, Any]]] = [
    (StreamingLLM, {}),
    (StreamingLLM, {"budget": 16, "sink_tokens": 0}),
    (H2O, {}),
    (H2O, {"budget": 0.1, "recent_ratio": 0.0}),
    (H2O, {"budget": 32, "recent_ratio": 0.9, "sink_tokens": 0}),
    (SnapKV, {}),
    (SnapKV, {"kernel_size": 1, "window": 8}),
    (SnapKV, {"pooling": "avg", "kernel_size": 5, "budget": 0.5}),
    (PyramidKV, {}),
    (PyramidKV, {"beta": 2.0, "budget": 64, "window": 16, "pooling": "avg"}),
    (PyramidKV, {"beta": 1.0, "budget": 0.9}),
    (AdaKV, {}),
    (AdaKV, {"floor_ratio": 0.0, "kernel_size": 1, "window": 8}),
    (AdaKV, {"floor_ratio": 1.0, "pooling": "avg", "kernel_size": 5, "budget": 0.5}),
    (ChunkKV, {}),
    (ChunkKV, {"chunk_size": 1, "reuse_layers": 3, "window": 8}),
    (ChunkKV, {"chunk_size": 32, "reuse_layers": 2, "budget": 0.5, "sink_tokens": 0}),
    (PoD, {}),
    (PoD, {"group_size": 3, "window": 8, "kernel_size": 1}),
    (PoD, {"group_size": 1, "budget": 0.5, "sink_tokens": 0}),
    (SpindleKV, {}),
    (SpindleKV, {"shallow_layers": 1.0, "similarity": -1.0, "window": 8}),
    (SpindleKV, {"shallow_layers": 0.0, "budget": 0.5, "sink_tokens": 0}),
    (LeanKV, {}),
    (LeanKV, {"mass_threshold": 0.5, "min_ratio": 0.0, "window": 8, "sink_tokens": 0}),
    (LeanKV, {"mass_threshold": 1.0, "min_ratio": 1.0, "budget": 64}),
    (KNorm, {}),
    (KNorm, {"window": 1, "sink_tokens": 0, "budget": 0.5}),
    (KeyDiff, {}),
    (KeyDiff, {"window": 8, "sink_tokens": 0, "budget": 32}),
    (TOVA, {}),
    (TOVA, {"per_layer": True, "window": 1, "sink_tokens": 0}),
    (ExpectedAttention, {}),
    (ExpectedAttention, {"use_covariance": False, "use_vnorm": False, "window": 8}),
    (ExpectedAttention, {"epsilon": 0.01, "sink_tokens": 0, "budget": 0.5}),
    (RKV, {}),
    (RKV, {"mix_lambda": 0.0, "similarity_threshold": -1.0, "kernel_size": 1, "window": 8}),
    (RKV, {"mix_lambda": 1.0, "pooling": "avg", "sink_tokens": 0, "budget": 0.5}),
]


def policy_id(entry: tuple[type[Policy], dict[str, Any]]) -> str:
    """Readable pytest id, e.g. ``snapkv-kernel_size=1-window=8``."""
    cls, kwargs = entry
    return "-".join([cls.name, *(f"{k}={v}" for k, v in kwargs.items())])
