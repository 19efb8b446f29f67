"""The embedding graph run as a numpy lookup: a bundle's embed.onnx is one Gather over an fp32 table.

Why: the decode loop embeds one token per step, and an ONNX Runtime call costs far more than the
lookup (its machinery runs cache-cold after each decoder step). Other embedding graphs run on ONNX
Runtime (`gather_table` returns None for them).
"""
from __future__ import annotations

import mmap

import numpy as np

from fromage.engines.errors import FromageError
from fromage.engines.onnx_weights import initializers, nodes, read_inline


class GatherTable:
    input_names = ["input_ids"]

    def __init__(self, table: np.ndarray, output_name: str):
        self.table, self.output_names = table, [output_name]

    def lookup(self, ids: list[int]) -> np.ndarray:
        """The embeddings of `ids`, (n, E); one id's is a view of the table (read-only), not a copy: the
        decode loop's lookup, right after a decoder step that left numpy's code and data cache-cold."""
        n = len(self.table)
        if not all(0 <= i < n for i in ids):
            raise FromageError(f"token id out of range 0..{n - 1}")
        return self.table[ids[0]:ids[0] + 1] if len(ids) == 1 else self.table[ids]

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> list[np.ndarray]:
        ids = np.asarray(feeds["input_ids"])
        if ids.size and (ids.min() < 0 or ids.max() >= len(self.table)):
            raise FromageError(f"token id out of range 0..{len(self.table) - 1}")
        return [self.table[ids]]


def gather_table(path, output_name: str = "inputs_embeds") -> GatherTable | None:
    """A GatherTable for `path` when it is one Gather over one inline 2-D float32 table, else None."""
    with open(path, "rb") as fh:
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            graph, tables = nodes(buf), initializers(buf)
        if [n["op"] for n in graph] != ["Gather"] or graph[0]["ints"].get("axis", 0) != 0 or len(tables) != 1:
            return None
        t = tables[0]
        if t["dtype"] != 1 or len(t["dims"]) != 2 or t["raw"] is None:
            return None
        table = np.empty(t["dims"], np.float32)
        read_inline(fh, t, table)
    table.flags.writeable = False  # lookups hand out views of it
    return GatherTable(table, output_name)
