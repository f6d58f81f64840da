"""Every number stored in an ONNX file is finite, checked on the file's bytes.

Serving does not depend on the `onnx` package, and onnxruntime does not expose initializers, so
this walks the protobuf wire format itself, reading only what carries numbers: initializers
(dense and sparse), tensor and float attributes of every node (Constant's `value`,
`value_float(s)` among them), in the main graph, its subgraphs and local functions. Field
numbers are those of onnx/onnx.proto. Only called on bytes onnxruntime has already loaded.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

# TensorProto.DataType values whose bytes can hold NaN or infinity, by numpy dtype.
_FLOATS = {1: "<f4", 10: "<f2", 11: "<f8", 14: "<f4", 15: "<f8"}
_BFLOAT16 = 16
# float8 and smaller formats: onnxruntime takes them, this check cannot read them.
_UNCHECKED = {17: "FLOAT8E4M3FN", 18: "FLOAT8E4M3FNUZ", 19: "FLOAT8E5M2", 20: "FLOAT8E5M2FNUZ",
              23: "FLOAT4E2M1", 24: "FLOAT8E8M0"}  # fmt: skip

_Fields = Iterator[tuple[int, int, "int | memoryview"]]


class NonFinite(ValueError):
    """A number in the file is NaN or infinite (or cannot be checked); the message says where."""


def check_finite(data: bytes) -> None:
    """Raise NonFinite naming the first initializer, constant or attribute that is not finite."""
    for field, _, value in _fields(memoryview(data)):
        if field == 7 and isinstance(value, memoryview):  # ModelProto.graph
            _graph(value, "graph")
        elif field == 25 and isinstance(value, memoryview):  # ModelProto.functions
            _nodes(value, 7, "function")  # FunctionProto.node


def _graph(buf: memoryview, where: str) -> None:
    _nodes(buf, 1, where)  # GraphProto.node
    for field, _, value in _fields(buf):
        if field == 5:  # initializer
            _tensor(value, "initializer")
        elif field == 15:  # sparse_initializer
            _sparse(value, "sparse initializer")


def _nodes(buf: memoryview, node_field: int, where: str) -> None:
    for field, _, node in _fields(buf):
        if field != node_field:
            continue
        name = op = ""
        attributes = []
        for f, _, value in _fields(node):
            if f == 3:
                name = _text(value)
            elif f == 4:
                op = _text(value)
            elif f == 5:
                attributes.append(value)
        for attribute in attributes:
            _attribute(attribute, f"{op} node {name!r}" if name else f"{op} node")


def _attribute(buf: memoryview, node: str) -> None:
    fields = list(_fields(buf))
    name = next((_text(v) for f, _, v in fields if f == 1), "")
    what = f"attribute {name!r} of {node}"
    _values(np.frombuffer(_joined(v for f, _, v in fields if f in (2, 7)), "<f4"), what)
    for field, _, value in fields:
        if field in (5, 10):  # t, tensors
            _tensor(value, what)
        elif field in (22, 23):  # sparse_tensor, sparse_tensors
            _sparse(value, what)
        elif field in (6, 11):  # g, graphs
            _graph(value, f"subgraph of {node}")


def _sparse(buf: memoryview, what: str) -> None:
    for field, _, value in _fields(buf):
        if field == 1:  # SparseTensorProto.values
            _tensor(value, what)


def _tensor(buf: memoryview, what: str) -> None:
    dtype, name = 1, ""
    raw: list[memoryview] = []
    floats: list[memoryview] = []  # float_data (4) or double_data (10), as stored
    halves: list[int] = []  # int32_data (5) carries float16 / bfloat16 bit patterns
    for field, wire, value in _fields(buf):
        if field == 2:
            dtype = int(value)
        elif field == 8:
            name = _text(value)
        elif field == 9:
            raw.append(value)
        elif field in (4, 10):
            floats.append(value)
        elif field == 5:
            halves += [value & 0xFFFF] if wire == 0 else list(_varints(value))
    if name:
        what = f"{what} {name!r}" if what.endswith("initializer") else f"{what} ({name!r})"
    if dtype in _UNCHECKED:
        raise NonFinite(f"{what} is {_UNCHECKED[dtype]}, which the finiteness check cannot read")
    if dtype == _BFLOAT16:
        bits = np.concatenate([np.frombuffer(b, "<u2") for b in raw] + [np.asarray(halves, "<u2")])
        if ((bits & 0x7F80) == 0x7F80).any():  # exponent all ones: infinity or NaN
            raise NonFinite(f"{what} contains NaN or infinite values")
        return
    if dtype not in _FLOATS:
        return
    code = _FLOATS[dtype]
    _values(np.frombuffer(_joined(raw), code), what)
    # float_data / double_data: packed in files onnx writes, one field per value otherwise.
    _values(np.frombuffer(_joined(floats), "<f8" if code == "<f8" else "<f4"), what)
    if halves:
        _values(np.asarray(halves, np.uint16).view("<f2"), what)


def _values(values: np.ndarray, what: str) -> None:
    bad = ~np.isfinite(values)
    if bad.any():
        raise NonFinite(
            f"{what} contains NaN or infinite values (first at flat index {int(bad.argmax())})"
        )


def _joined(chunks: Iterable[memoryview]) -> memoryview | bytes:
    chunks = list(chunks)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _text(value: int | memoryview) -> str:
    text = bytes(value).decode("utf-8", "replace") if isinstance(value, memoryview) else ""
    return text if len(text) <= 64 else text[:64] + "..."


def _varint(buf: memoryview, i: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, i
        shift += 7


def _varints(buf: memoryview) -> Iterator[int]:
    i = 0
    while i < len(buf):
        v, i = _varint(buf, i)
        yield v & 0xFFFF


def _fields(buf: memoryview) -> _Fields:
    """(field number, wire type, value) of one message: an int for varints, the bytes (a view,
    not a copy) otherwise."""
    i, n = 0, len(buf)
    while i < n:
        key, i = _varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
            yield field, wire, value
            continue
        if wire == 2:
            size, i = _varint(buf, i)
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
        else:
            raise NonFinite(f"not a protobuf message (wire type {wire})")
        yield field, wire, buf[i : i + size]
        i += size
