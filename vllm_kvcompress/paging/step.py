"""What one forward step does to the cache, request by request."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass(frozen=True)
class StepRequest:
    """One scheduled request of a step, as the model runner sees it."""

    req_id: str
    computed_before: int  # tokens already cached (logical, i.e. before eviction)
    num_new: int  # tokens this step appends
    prompt_len: int

    @property
    def total_after(self) -> int:
        return self.computed_before + self.num_new

    @property
    def in_prefill(self) -> bool:
        return self.computed_before < self.prompt_len

    @property
    def ends_prefill(self) -> bool:
        return self.in_prefill and self.total_after >= self.prompt_len


@dataclass
class StepPlan:
    """Batch-order view of a step, built once and read by every layer."""

    requests: list[StepRequest]
    slots: np.ndarray  # [B] store slot of each request
    starts: np.ndarray  # [B + 1] token offsets of each request in the batch
    positions: torch.Tensor  # [N] logical position of every token
    token_rows: np.ndarray  # [N, H] row of every (token, KV head)
    token_offsets: np.ndarray  # [N, 1] index of the token among its request's new tokens
    decode: np.ndarray  # batch indices with exactly one new token
    chunks: np.ndarray  # batch indices with more than one new token
    request_rows: np.ndarray  # [B * H] rows of every request, request-major
    decode_tokens: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.decode_tokens = torch.from_numpy(self.starts[self.decode])

    @classmethod
    def build(cls, requests: list[StepRequest], slots: np.ndarray, num_kv_heads: int) -> StepPlan:
        num_new = np.array([r.num_new for r in requests], dtype=np.int64)
        computed = np.array([r.computed_before for r in requests], dtype=np.int64)
        starts = np.zeros(len(requests) + 1, dtype=np.int64)
        np.cumsum(num_new, out=starts[1:])
        owner = np.repeat(np.arange(len(requests)), num_new)
        offsets = np.arange(starts[-1]) - starts[owner]
        token_rows = (slots[owner] * num_kv_heads)[:, None] + np.arange(num_kv_heads)
        return cls(
            requests=requests,
            slots=slots,
            starts=starts,
            positions=torch.from_numpy(computed[owner] + offsets),
            token_rows=token_rows,
            token_offsets=offsets[:, None],
            decode=np.flatnonzero(num_new == 1),
            chunks=np.flatnonzero(num_new > 1),
            request_rows=((slots * num_kv_heads)[:, None] + np.arange(num_kv_heads)).reshape(-1),
        )

    @property
    def num_tokens(self) -> int:
        return int(self.starts[-1])
