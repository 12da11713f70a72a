"""The app model made small: weights stored in 8 or 4 bits, dequantized once; one graph for both signatures.

The converter's dynamic-range quantization stores int8 weights with one
scale per tensor and runs "hybrid" kernels that also quantize the
activations to int8 on every call. Both cost top-1 agreement with the float
model: one scale for the whole embedding is coarse for the rows of rare
words, and the quantized activations move the output layer's logits. It
also converts each signature into a graph of its own, so the unrolled
network is stored twice.

So the app model is converted in float and then rewritten here:

* each weight of the layout is stored as int8 or int4 with one scale per
  channel (`Precision`), or as float16, and a DEQUANTIZE op in front turns
  it back into the float tensor the graph used. LiteRT dequantizes a
  constant once, at the first call, and keeps the float copy, so inference
  runs in float (only the weights are rounded) at a float model's speed,
  while the file holds 8 or 4 bits per weight;
* one output of a signature can be served as a signature of its own from
  the same graph (`extra_signature`): the app model's `distribution` is the
  `suggest` graph's distribution, so the network is stored once.

The dequantized weights are exactly `dequantize(*quantize(w, ...))`, so
what the phone computes can be reproduced in TensorFlow or NumPy
(benchmarks/export.py measures agreement that way too).
"""
from __future__ import annotations

import dataclasses

import flatbuffers
import numpy as np
from ai_edge_litert import schema_py_generated as schema

_DEQUANTIZE = schema.BuiltinOperator.DEQUANTIZE


@dataclasses.dataclass(frozen=True)
class Precision:
    """How one weight of the layout is stored in the app model."""

    bits: int = 8                  # 8 or 4: symmetric integers; 16: float16; 32: float32, as converted
    axis: int | None = None        # integer bits: the axis of the array with a scale per index (None: one scale)

    def __post_init__(self):
        if self.bits not in (4, 8, 16, 32):
            raise ValueError(f"precision: bits must be 4, 8, 16 or 32, not {self.bits}")


def quantize(w: np.ndarray, bits: int, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric quantization of `w` to `bits` (4 or 8), each value to its nearest level: int8 values in
    [-2^(bits-1)+1, 2^(bits-1)-1] and float32 scales, one per index of `axis` (one in all for None)."""
    w = np.asarray(w, np.float32)
    top = 2 ** (bits - 1) - 1
    reduce = tuple(i for i in range(w.ndim) if i != axis) if axis is not None else None
    amax = np.abs(w).max(axis=reduce, keepdims=True) if w.size else np.zeros([1] * w.ndim, np.float32)
    scale = np.where(amax > 0, amax / top, 1.0).astype(np.float32)
    return np.clip(np.rint(w / scale), -top, top).astype(np.int8), scale.reshape(-1)


def dequantize(q: np.ndarray, scale: np.ndarray, axis: int | None) -> np.ndarray:
    """The float32 weights a phone computes from `quantize`'s output."""
    shape = [1] * q.ndim
    if axis is not None:
        shape[axis] = -1
    return q.astype(np.float32) * np.asarray(scale, np.float32).reshape(shape)


def rounded(w: np.ndarray, precision: Precision) -> np.ndarray:
    """`w` as the app model stores it, back in float32: what inference on the phone multiplies with."""
    if precision.bits == 32:
        return np.asarray(w, np.float32)
    if precision.bits == 16:
        return np.asarray(w, np.float16).astype(np.float32)
    return dequantize(*quantize(w, precision.bits, precision.axis), precision.axis)


def pack_int4(q: np.ndarray) -> np.ndarray:
    """int8 values in [-8, 7] → LiteRT's INT4 buffer: two per byte, the first in the low nibble."""
    flat = q.reshape(-1).astype(np.int16) & 0xF
    if len(flat) % 2:
        flat = np.append(flat, 0)
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)


def stored_bytes(shape: tuple[int, ...], precision: Precision) -> int:
    """Bytes of one weight's data and quantization parameters (a float32 scale and an int64 zero point
    per channel), before the flatbuffer's own overhead."""
    n = int(np.prod(shape))
    if precision.bits >= 16:
        return n * precision.bits // 8
    channels = shape[precision.axis] if precision.axis is not None else 1
    return (n * precision.bits + 7) // 8 + 12 * channels


def compact(model: bytes, weights: dict[str, np.ndarray], precision: dict[str, Precision],
            extra_signature: tuple[str, str, str, str] | None = None) -> bytes:
    """Rewrite a float .tflite: every constant equal to one of `weights` (name → array, matched as stored,
    or transposed as FULLY_CONNECTED stores it) is stored at `precision[name]` (float32 if not named);
    `extra_signature` (signature, its output, new signature, the new one's output name) moves that output
    to a signature of its own on the same graph."""
    root = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(model, 0))
    if extra_signature is not None:
        _split_signature(root, *extra_signature)
    deq = _opcode(root, _DEQUANTIZE)
    stored: dict[tuple[str, bool], tuple[int, list[float], int | None]] = {}
    matched = set()
    for graph in root.subgraphs:
        front = []
        for index, tensor in enumerate(list(graph.tensors)):
            found = _match(root, tensor, weights)
            if found is None:
                continue
            matched.add(found[0])
            p = precision.get(found[0], Precision(32))
            if p.bits == 32:
                continue
            if found not in stored:                  # the same weight in two graphs (a loop's body) is kept once
                stored[found] = _store(root, weights[found[0]], p, found[1])
            buffer, scale, axis = stored[found]
            graph.tensors.append(_quantized_tensor(tensor, buffer, p, scale, axis))
            tensor.buffer = 0                    # the float tensor is now DEQUANTIZE's output
            op = schema.OperatorT()
            op.opcodeIndex, op.inputs, op.outputs = deq, [len(graph.tensors) - 1], [index]
            front.append(op)
        graph.operators = front + list(graph.operators)
    missing = {name for name in set(precision) - matched if np.any(weights[name])}   # zeros may be folded away
    if missing:
        raise ValueError(f"compact: no constant in the model equals {sorted(missing)}")
    _drop_unused_buffers(root)
    builder = flatbuffers.Builder(len(model))
    builder.Finish(root.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def _match(root, tensor, weights: dict[str, np.ndarray]) -> tuple[str, bool] | None:
    """(name, stored transposed?) of the weight this constant float tensor holds, or None."""
    data = root.buffers[tensor.buffer].data if tensor.buffer < len(root.buffers) else None
    if tensor.type != schema.TensorType.FLOAT32 or data is None or len(data) < 4:
        return None
    shape = tuple(int(d) for d in tensor.shape) if tensor.shape is not None else ()
    value = np.frombuffer(np.asarray(data, np.uint8).tobytes(), np.float32)
    for name, w in weights.items():
        w = np.asarray(w)
        if w.dtype != np.float32 or w.size != value.size:
            continue
        if w.shape == shape and np.array_equal(w.reshape(-1), value):
            return name, False
        if w.ndim == 2 and w.T.shape == shape and np.array_equal(w.T.reshape(-1), value):
            return name, True
    return None


def _store(root, w: np.ndarray, p: Precision, transposed: bool) -> tuple[int, list[float], int | None]:
    """Append layout weight `w` at precision `p` (transposed, as the graph holds it, if `transposed`) to
    the buffers: (buffer, scales, the graph tensor's axis of the scales)."""
    if p.bits == 16:
        data = np.asarray(w.T if transposed else w, np.float16)
        return _append(root, data.view(np.uint8).reshape(-1)), [], None
    q, scale = quantize(w, p.bits, p.axis)
    axis = p.axis
    if transposed:
        q, axis = q.T, None if axis is None else q.ndim - 1 - axis
    data = pack_int4(q) if p.bits == 4 else np.ascontiguousarray(q).view(np.uint8).reshape(-1)
    return _append(root, data), scale.tolist(), axis


def _append(root, data: np.ndarray) -> int:
    root.buffers.append(schema.BufferT(data=np.ascontiguousarray(data)))
    return len(root.buffers) - 1


def _quantized_tensor(like, buffer: int, p: Precision, scale: list[float], axis: int | None):
    t = schema.TensorT()
    t.shape, t.buffer, t.name = list(like.shape), buffer, (like.name or b"") + b"/stored"
    t.type = {4: schema.TensorType.INT4, 8: schema.TensorType.INT8, 16: schema.TensorType.FLOAT16}[p.bits]
    if p.bits < 16:
        t.quantization = schema.QuantizationParametersT(scale=scale, zeroPoint=[0] * len(scale),
                                                        quantizedDimension=axis or 0)
    return t


def _opcode(root, builtin: int) -> int:
    for i, code in enumerate(root.operatorCodes):
        if max(code.builtinCode, code.deprecatedBuiltinCode) == builtin:
            return i
    root.operatorCodes.append(schema.OperatorCodeT(deprecatedBuiltinCode=builtin, builtinCode=builtin))
    return len(root.operatorCodes) - 1


def _split_signature(root, signature: str, output: str, new: str, name: str) -> None:
    by_key = {sd.signatureKey.decode(): sd for sd in root.signatureDefs}
    source = by_key.get(signature)
    outputs = {m.name.decode(): m for m in source.outputs} if source is not None else {}
    if output not in outputs or new in by_key:
        raise ValueError(f"compact: needs signature {signature!r} with output {output!r}, and no {new!r}")
    source.outputs = [m for m in source.outputs if m.name.decode() != output]
    sd = schema.SignatureDefT()
    sd.signatureKey, sd.subgraphIndex = new.encode(), source.subgraphIndex
    sd.inputs = [schema.TensorMapT() for _ in source.inputs]
    for mine, theirs in zip(sd.inputs, source.inputs):
        mine.name, mine.tensorIndex = theirs.name, theirs.tensorIndex
    sd.outputs = [schema.TensorMapT()]
    sd.outputs[0].name, sd.outputs[0].tensorIndex = name.encode(), outputs[output].tensorIndex
    root.signatureDefs.append(sd)


def _drop_unused_buffers(root) -> None:
    """Keep buffer 0 (the empty one every non-constant tensor points at) and the buffers some tensor
    still uses, renumbered in their order."""
    used = sorted({t.buffer for g in root.subgraphs for t in g.tensors} - {0})
    renumber = {old: new for new, old in enumerate(used, start=1)}
    root.buffers = [root.buffers[0]] + [root.buffers[i] for i in used]
    for graph in root.subgraphs:
        for tensor in graph.tensors:
            tensor.buffer = renumber.get(tensor.buffer, 0)
