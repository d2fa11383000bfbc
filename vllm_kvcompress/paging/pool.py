"""A pool of fixed-size pages with O(1) allocate and free.

Free page ids live in a stack tensor on the store's device; allocation pops
the top ``n`` ids and freeing pushes them back, each one tensor copy. The
count of free pages is kept on the host, so callers decide without a device
sync. Check/act pairs as in nano-vllm's block manager: ``can_allocate`` then
``allocate`` (which returns ``None`` rather than raising when short).
"""

from __future__ import annotations

import torch


class PagePool:
    def __init__(self, num_pages: int, device: torch.device | str = "cpu") -> None:
        if num_pages <= 0:
            raise ValueError(f"a page pool needs at least one page, got {num_pages}")
        self.num_pages = num_pages
        # Reversed so that the first allocations get the low page ids.
        self._stack = torch.arange(num_pages - 1, -1, -1, dtype=torch.int32, device=device)
        self._num_free = num_pages

    @property
    def num_free(self) -> int:
        return self._num_free

    @property
    def num_used(self) -> int:
        return self.num_pages - self._num_free

    def can_allocate(self, n: int) -> bool:
        return n <= self._num_free

    def allocate(self, n: int) -> torch.Tensor | None:
        """Pop ``n`` page ids (int32 tensor), or ``None`` if fewer are free."""
        if n > self._num_free:
            return None
        self._num_free -= n
        return self._stack[self._num_free : self._num_free + n].clone()

    def free(self, pages: torch.Tensor) -> None:
        """Return page ids to the pool; ``pages`` must hold allocated, distinct ids."""
        n = pages.numel()
        if n == 0:
            return
        if self._num_free + n > self.num_pages:
            raise RuntimeError(
                f"freeing {n} pages into a pool with {self._num_free}/{self.num_pages} free: "
                "a page was freed twice"
            )
        self._stack[self._num_free : self._num_free + n] = pages.reshape(-1).to(torch.int32)
        self._num_free += n
