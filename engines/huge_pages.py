"""Memory on transparent huge pages, for what the kernels read every step: the weights they stream and the
KV caches attention reads.

With 4 KiB pages a read that crosses into a new page waits for its translation, and after a step has
streamed the weights through every cache the page tables are cold too: the weights' streams and attention's
many short reads each layer are slower (README, Performance). Where the kernel has no transparent huge pages
(or madvise fails), this is plain memory."""
from __future__ import annotations

import mmap
import threading
import weakref

import numpy as np

HUGE_PAGE = 2 << 20
KEEP_BYTES = 256 << 20  # the most memory of dropped arenas kept for the next ones (_Reuse)


class _Reuse:
    """Mappings whose arenas' arrays have all been dropped, by size, kept (up to KEEP_BYTES in all) for the next
    arena of that size. A server makes and drops a cache per request, and a fresh mapping's huge pages are faulted
    in as it is first written: on a virtual machine whose host has not backed that memory yet, milliseconds a
    page (every decoding stream of a server waits)."""

    def __init__(self):
        self.maps: dict[int, list[mmap.mmap]] = {}
        self.kept = 0
        self.lock = threading.Lock()  # arrays are dropped in any thread

    def take(self, size: int) -> mmap.mmap | None:
        with self.lock:
            maps = self.maps.get(size)
            if not maps:
                return None
            self.kept -= size
            return maps.pop()

    def give(self, map: mmap.mmap, size: int) -> None:
        with self.lock:
            if self.kept + size <= KEEP_BYTES:
                self.maps.setdefault(size, []).append(map)
                self.kept += size


_reuse = _Reuse()


class Arena:
    """nbytes of one anonymous private mapping (zero-filled when fresh), starting on a huge page, handed out front
    to back in 64-byte-aligned pieces. Its whole huge pages are asked for as such (madvise); a last part smaller
    than one stays on 4 KiB pages, so that memory is only what the pieces take."""

    def __init__(self, nbytes: int, reuse: bool = False):
        """reuse: the mapping may be one that an earlier arena of nbytes (made with reuse) left, as that left it;
        and it is left for the next one when the last array of this one is dropped."""
        size = nbytes + HUGE_PAGE
        self.map = _reuse.take(size) if reuse else None
        fresh = self.map is None
        if fresh:
            self.map = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)
        raw = np.frombuffer(self.map, np.uint8)
        start = -raw.ctypes.data % HUGE_PAGE
        self.free = raw[start:start + nbytes]
        if fresh and nbytes:
            self._advise(start, nbytes // HUGE_PAGE * HUGE_PAGE)
        if reuse:
            weakref.finalize(raw, _reuse.give, self.map, size)

    def _advise(self, start: int, whole: int) -> None:
        try:
            if whole:
                self.map.madvise(mmap.MADV_HUGEPAGE, start, whole)
            # the rest not, also where the kernel would give huge pages unasked
            self.map.madvise(mmap.MADV_NOHUGEPAGE, start + whole, len(self.map) - start - whole)
        except (AttributeError, OSError):  # no transparent huge pages in this kernel: 4 KiB pages
            pass

    @staticmethod
    def padded(nbytes: int) -> int:
        return -(-nbytes // 64) * 64

    def take(self, nbytes: int) -> np.ndarray:
        """The next nbytes, starting on a 64-byte boundary."""
        out, self.free = self.free[:nbytes], self.free[self.padded(nbytes):]
        return out


def cache_arrays(shape: tuple, dtype, count: int) -> list[np.ndarray]:
    """count C-contiguous arrays of `shape` and `dtype` for a KV cache: in one arena when together they fill a huge
    page at least (zeros when fresh; a dropped cache's values when reused, not zeroed again, a prefill's cost: a
    cache's positions are written before any step reads them), else numpy's zeros."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    if count * nbytes < HUGE_PAGE:
        return [np.zeros(shape, dtype) for _ in range(count)]
    arena = Arena(count * Arena.padded(nbytes), reuse=True)
    return [arena.take(nbytes).view(dtype).reshape(shape) for _ in range(count)]
