"""Memory on transparent huge pages, for what the kernels read every step: the weights they stream and the
KV caches attention reads.

With 4 KiB pages a read that crosses into a new page waits for its translation, and after a step has
streamed the weights through every cache the page tables are cold too: the weights' kernels read ~15 %
slower, and a KV cache's attention, which starts many short reads each layer, ~20 % slower (README,
Performance). Where the kernel has no transparent huge pages (or madvise fails), this is plain memory."""
from __future__ import annotations

import mmap

import numpy as np

HUGE_PAGE = 2 << 20


class Arena:
    """nbytes of one anonymous private mapping (zero-filled), starting on a huge page, handed out front to back in
    64-byte-aligned pieces. Its whole huge pages are asked for as such (madvise); a last part smaller than one
    stays on 4 KiB pages, so that memory is only what the pieces take."""

    def __init__(self, nbytes: int):
        self.map = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE)
        raw = np.frombuffer(self.map, np.uint8)
        start = -raw.ctypes.data % HUGE_PAGE
        whole = nbytes // HUGE_PAGE * HUGE_PAGE
        try:
            if whole:
                self.map.madvise(mmap.MADV_HUGEPAGE, start, whole)
            # the rest not, also where the kernel would give huge pages unasked
            self.map.madvise(mmap.MADV_NOHUGEPAGE, start + whole, len(self.map) - start - whole)
        except (AttributeError, OSError):  # no transparent huge pages in this kernel: 4 KiB pages
            pass
        self.free = raw[start:start + nbytes]

    @staticmethod
    def padded(nbytes: int) -> int:
        return -(-nbytes // 64) * 64

    def take(self, nbytes: int) -> np.ndarray:
        """The next nbytes, starting on a 64-byte boundary."""
        out, self.free = self.free[:nbytes], self.free[self.padded(nbytes):]
        return out


def zeroed_arrays(shape: tuple, dtype, count: int) -> list[np.ndarray]:
    """count zero-filled C-contiguous arrays of `shape` and `dtype`: in one arena when together they fill a huge
    page at least, else numpy's own."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    if count * nbytes < HUGE_PAGE:
        return [np.zeros(shape, dtype) for _ in range(count)]
    arena = Arena(count * Arena.padded(nbytes))
    return [arena.take(nbytes).view(dtype).reshape(shape) for _ in range(count)]
