"""What an ONNX file says about itself, read without onnx or torch: its metadata_props, its graph's inputs and
outputs with their shapes, and the operator types its nodes use.

OpenCV's DNN module cannot read ``metadata_props``, and the opencv-only set-up has no ``onnx`` package, so these few
fields are read here straight from protobuf's wire format: each field is a varint tag (field number << 3 | wire
type) followed by a varint, 8 or 4 fixed bytes, or a varint length and that many bytes. Large fields (the
weights) are skipped by seeking, so a 218 MB graph is read in a few kilobytes. Field numbers are onnx.proto's.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

MODEL_GRAPH, MODEL_METADATA, MODEL_FUNCTIONS = 7, 14, 25  # ModelProto.graph, .metadata_props, .functions
GRAPH_NODE, GRAPH_INPUT, GRAPH_OUTPUT = 1, 11, 12  # GraphProto.node (NodeProto), .input, .output (ValueInfoProto)
NODE_OP_TYPE, FUNCTION_NODE = 4, 7  # NodeProto.op_type; FunctionProto.node
ENTRY_KEY, ENTRY_VALUE = 1, 2  # StringStringEntryProto
INFO_NAME, INFO_TYPE = 1, 2  # ValueInfoProto: name, type (TypeProto)
TYPE_TENSOR, TENSOR_SHAPE, SHAPE_DIM = 1, 2, 1  # TypeProto.tensor_type -> .shape -> TensorShapeProto.dim
DIM_VALUE, DIM_PARAM = 1, 2  # TensorShapeProto.Dimension: a number, or the name of a dynamic one
VARINT, FIXED64, LENGTH, FIXED32 = 0, 1, 2, 5  # the wire types ONNX uses
MAX_READ = 16 * 2**20  # the most bytes one small field (a metadata entry, an input's type) may claim


class NotOnnx(ValueError):
    """The file is not an ONNX model this reader can follow; the message says where it stopped."""


@dataclass(frozen=True)
class GraphHeader:
    metadata: dict[str, str]  # ModelProto.metadata_props
    inputs: dict[str, tuple[int | str, ...]]  # each graph input's dims: a size, or a dynamic dim's name ("batch")
    outputs: dict[str, tuple[int | str, ...]]
    op_types: frozenset[str] = frozenset()  # the operators of the graph's nodes and of the model's functions


def _varint(f: BinaryIO) -> int:
    value = 0
    for shift in range(0, 70, 7):
        byte = f.read(1)
        if not byte:
            raise NotOnnx("it ends inside a field")
        value |= (byte[0] & 0x7F) << shift
        if byte[0] < 0x80:
            return value
    raise NotOnnx("a varint longer than 10 bytes")


def _fields(f: BinaryIO, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, value, length) of each field in f[start:end]; for a length-delimited field the
    value is the offset of its ``length`` bytes, which the caller may read or leave (other fields: length 0)."""
    position = start
    while position < end:
        f.seek(position)
        tag = _varint(f)
        number, wire, length = tag >> 3, tag & 7, 0
        if wire == VARINT:
            value = _varint(f)
        elif wire in (FIXED64, FIXED32):
            value = f.tell()
            f.seek(8 if wire == FIXED64 else 4, io.SEEK_CUR)
        elif wire == LENGTH:
            length = _varint(f)
            value = f.tell()
            f.seek(length, io.SEEK_CUR)
        else:
            raise NotOnnx(f"wire type {wire} at byte {position}")
        position = f.tell()
        if position > end or number == 0:
            raise NotOnnx(f"a field runs past its message's end at byte {position}")
        yield number, wire, value, length


def _read(f: BinaryIO, offset: int, length: int) -> bytes:
    if length > MAX_READ:
        raise NotOnnx(f"a {length}-byte field where a small one belongs")
    f.seek(offset)
    return f.read(length)


def _message(data: bytes) -> dict[int, list]:
    """A small message's fields: number -> its values (ints, or bytes for length-delimited ones), in order."""
    f, fields = io.BytesIO(data), {}
    for number, wire, value, length in _fields(f, 0, len(data)):
        fields.setdefault(number, []).append(_read(f, value, length) if wire == LENGTH else value)
    return fields


def _text(value: bytes) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise NotOnnx("a string that is not UTF-8") from None


def _value_info(data: bytes) -> tuple[str, tuple[int | str, ...]]:
    """(name, dims) of a ValueInfoProto; dims is () when the type has no shape."""
    info = _message(data)
    name = _text(info.get(INFO_NAME, [b""])[0])
    tensor = _message(_message(info[INFO_TYPE][0]).get(TYPE_TENSOR, [b""])[0]) if INFO_TYPE in info else {}
    dims = []
    for dim in _message(tensor[TENSOR_SHAPE][0]).get(SHAPE_DIM, []) if TENSOR_SHAPE in tensor else []:
        fields = _message(dim)
        dims.append(fields[DIM_VALUE][0] if DIM_VALUE in fields else _text(fields.get(DIM_PARAM, [b"?"])[0]))
    return name, tuple(dims)


def _op_type(f: BinaryIO, offset: int, length: int) -> str:
    """A NodeProto's op_type, read field by field (a node's attributes may hold a constant tensor: not read)."""
    for number, wire, value, inner_length in _fields(f, offset, offset + length):
        if number == NODE_OP_TYPE and wire == LENGTH:
            return _text(_read(f, value, inner_length))
    return ""


def _graph(f: BinaryIO, start: int, end: int, inputs: dict, outputs: dict, op_types: set) -> None:
    """A GraphProto's inputs, outputs and node operators, into the dicts and the set given."""
    for number, wire, offset, length in _fields(f, start, end):
        if number in (GRAPH_INPUT, GRAPH_OUTPUT) and wire == LENGTH:
            name, dims = _value_info(_read(f, offset, length))
            (inputs if number == GRAPH_INPUT else outputs)[name] = dims
        elif number == GRAPH_NODE and wire == LENGTH:
            op_types.add(_op_type(f, offset, length))


def read_graph_header(path: Path) -> GraphHeader:
    """The metadata, the input and output shapes and the node operators of the ONNX model at ``path``; NotOnnx if it
    is not one."""
    metadata, inputs, outputs, op_types, graphs = {}, {}, {}, set(), 0
    with open(path, "rb") as f:
        size = f.seek(0, io.SEEK_END)
        for number, wire, value, length in _fields(f, 0, size):
            if wire != LENGTH:
                continue
            if number == MODEL_METADATA:
                entry = _message(_read(f, value, length))
                metadata[_text(entry.get(ENTRY_KEY, [b""])[0])] = _text(entry.get(ENTRY_VALUE, [b""])[0])
            elif number == MODEL_GRAPH:
                graphs += 1
                _graph(f, value, value + length, inputs, outputs, op_types)
            elif number == MODEL_FUNCTIONS:
                for inner, inner_wire, offset, inner_length in _fields(f, value, value + length):
                    if inner == FUNCTION_NODE and inner_wire == LENGTH:
                        op_types.add(_op_type(f, offset, inner_length))
    if graphs != 1 or not inputs or not outputs:
        raise NotOnnx("no graph with inputs and outputs")
    return GraphHeader(metadata, inputs, outputs, frozenset(op_types - {""}))
