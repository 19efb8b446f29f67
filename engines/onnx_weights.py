"""An ONNX graph's weights without the onnx package (a minimal protobuf walk): their bytes per token
for the roofline of `fromage bench`, and where each inline tensor lies in the file, so the native
decoder (and the embedding lookup) can read them straight into buffers of their own."""
from __future__ import annotations

import math
import mmap

from .errors import FromageError

_ITEMSIZE = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 14: 8, 15: 16, 16: 2,
             17: 1, 18: 1, 19: 1, 20: 1, 21: 0.5, 22: 0.5, 23: 0.5}


def _varint(buf, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, i
        shift += 7


def _fields(buf, start: int, end: int):
    """(field number, wire type, value or payload start, payload end) of one protobuf message."""
    i = start
    while i < end:
        key, i = _varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            v, i = _varint(buf, i)
            yield field, wire, v, None
        elif wire == 2:
            n, i = _varint(buf, i)
            yield field, wire, i, i + n
            i += n
        elif wire in (1, 5):
            i += 8 if wire == 1 else 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")


def _tensor(buf, start: int, end: int) -> dict:
    """name, dims, dtype (TensorProto code), raw: (start, end) of inline raw_data or None, external: length."""
    dims, dtype, raw, external, name = [], 1, None, None, ""
    for f, w, a, b in _fields(buf, start, end):
        if f == 8 and w == 2:
            name = bytes(buf[a:b]).decode("utf-8", "replace")
        elif f == 1 and w == 0:
            dims.append(a)
        elif f == 1 and w == 2:  # packed dims
            j = a
            while j < b:
                d, j = _varint(buf, j)
                dims.append(d)
        elif f == 2 and w == 0:
            dtype = a
        elif f == 9 and w == 2:
            raw = (a, b)
        elif f == 13 and w == 2:  # external data entry: key/value strings
            kv = {f2: bytes(buf[a2:b2]) for f2, w2, a2, b2 in _fields(buf, a, b) if w2 == 2}
            if kv.get(1) == b"length":
                external = int(kv.get(2, b"0"))
    return {"name": name, "dims": dims, "dtype": dtype, "raw": raw, "external": external}


def _nbytes(t: dict) -> int:
    if t["raw"] is not None:
        return t["raw"][1] - t["raw"][0]
    if t["external"] is not None:
        return t["external"]
    return int(math.prod(t["dims"]) * _ITEMSIZE.get(t["dtype"], 4))


def initializers(buf) -> list[dict]:
    """The initializers of the ONNX model in `buf` (bytes or an mmap), as _tensor dicts."""
    out = []
    for f, w, a, b in _fields(buf, 0, len(buf)):
        if f == 7 and w == 2:  # ModelProto.graph
            out += [_tensor(buf, a2, b2) for f2, w2, a2, b2 in _fields(buf, a, b) if f2 == 5 and w2 == 2]
    return out


def nodes(buf) -> list[dict]:
    """The ONNX model's graph nodes, in order: {"op": op type, "ints": its integer attributes}."""
    out = []
    for f, w, a, b in _fields(buf, 0, len(buf)):
        if f == 7 and w == 2:  # ModelProto.graph -> GraphProto.node
            for f2, w2, a2, b2 in _fields(buf, a, b):
                if f2 != 1 or w2 != 2:
                    continue
                node = {"op": "", "ints": {}}
                for f3, w3, a3, b3 in _fields(buf, a2, b2):
                    if f3 == 4 and w3 == 2:  # NodeProto.op_type
                        node["op"] = bytes(buf[a3:b3]).decode()
                    elif f3 == 5 and w3 == 2:  # NodeProto.attribute: name (1), i (3)
                        attr = {f4: (bytes(buf[a4:b4]).decode() if w4 == 2 else a4) for f4, w4, a4, b4 in _fields(buf, a3, b3)
                                if (f4, w4) in ((1, 2), (3, 0))}
                        if 3 in attr:
                            node["ints"][attr.get(1, "")] = attr[3]
                out.append(node)
    return out


def read_inline(fh, t: dict, out) -> None:
    """Reads the inline bytes of tensor `t` (an `initializers` entry) from the open file `fh` into `out`,
    a writable buffer of exactly that size."""
    a, b = t["raw"]
    fh.seek(a)
    if fh.readinto(memoryview(out).cast("B")) != b - a:
        raise FromageError(f"{fh.name}: truncated at {t['name']!r}")


# tables of which a decode step reads one row (the fused decoder's rotary cos/sin), not weights
ROW_TABLES = {"cos_cache", "sin_cache"}


def initializer_bytes(path) -> int:
    """Sum of the bytes of an ONNX graph's initializers (inline or external), but for ROW_TABLES:
    the weights read per token."""
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        return sum(_nbytes(t) for t in initializers(buf) if t["name"] not in ROW_TABLES)
