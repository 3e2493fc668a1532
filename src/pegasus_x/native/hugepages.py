"""CPU tensors in 2 MB pages, for what a decode step streams: the weights and the cross-attention keys/values.

A decode step reads every decoder weight and the LM head once per token. With the usual 4 KB pages the hardware
prefetcher stops at every page boundary (and the TLB misses every 4 KB): streaming the same weights from 2 MB pages
ran faster in A/B runs of ``benchmarks/generate.py`` (logged in ``benchmarks/RESULTS.md``). Linux gives an anonymous mapping huge pages when it is advised
(``MADV_HUGEPAGE``; transparent huge pages in their default ``madvise`` mode). Elsewhere, or when the system turns
them off, the same code simply gets ordinary pages.
"""

from __future__ import annotations

import math
import mmap

import torch
from torch import Tensor

PAGE = 2 << 20          # the x86-64 / arm64 huge page size
ALIGN = 64              # each tensor starts on a cache line


def supported() -> bool:
    """Whether this platform can advise huge pages (Linux)."""
    return hasattr(mmap, "MADV_HUGEPAGE")


def nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Bytes a tensor of this shape and dtype takes in an :class:`Arena` (rounded up to :data:`ALIGN`)."""
    return -(-math.prod(shape) * dtype.itemsize // ALIGN) * ALIGN


class Arena:
    """One block of ``size`` bytes advised for huge pages; :meth:`empty` hands out consecutive tensors from it.

    The block is an anonymous mapping that the tensors keep alive (``torch.frombuffer`` holds a reference), so it
    is unmapped when the last of them goes. Pages are only touched, and so only counted, when written. Where huge
    pages cannot be advised the block is an ordinary tensor.
    """

    def __init__(self, size: int):
        if supported():
            self._map = mmap.mmap(-1, size + PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            self._map.madvise(mmap.MADV_HUGEPAGE)
            raw = torch.frombuffer(self._map, dtype=torch.uint8)
        else:                                              # ordinary pages, same interface
            raw = torch.empty(size + PAGE, dtype=torch.uint8)
        start = -raw.data_ptr() % PAGE                     # huge pages need a 2 MB-aligned start
        self._block = raw[start:start + size]
        self._used = 0

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        """An uninitialised contiguous tensor in the arena."""
        count, size = math.prod(shape), nbytes(shape, dtype)
        if self._used + size > self._block.numel():
            raise ValueError(f"Arena of {self._block.numel()} bytes is full; size it with nbytes() of every tensor")
        out = self._block[self._used:self._used + count * dtype.itemsize].view(dtype).view(shape)
        self._used += size
        return out
