"""What is inside a .tflite flatbuffer: its operators and signatures. TensorFlow-free.

The export uses it to refuse a model with Flex or custom ops (the converter's
own report is not enough: a model converted elsewhere, or with other settings,
must be checked too), the manifest records the signatures from it, and
`python -m tflite_export inspect` prints it.
"""
from __future__ import annotations

from ai_edge_litert import schema_py_generated as schema

from tflite_export.errors import UnsupportedOpError

_BUILTIN_NAMES = {code: name for name, code in vars(schema.BuiltinOperator).items()
                  if not name.startswith("_")}
_TYPE_NAMES = {code: name.lower() for name, code in vars(schema.TensorType).items()
               if not name.startswith("_")}


def operator_names(model: bytes) -> list[str]:
    """Operator codes of the model: built-in names, or "CUSTOM:<code>" (Flex ops are "CUSTOM:Flex…")."""
    root = schema.Model.GetRootAsModel(model, 0)
    names = []
    for i in range(root.OperatorCodesLength()):
        code = root.OperatorCodes(i)
        # Codes < 127 live in the deprecated int8 field; newer ones in the int32 field.
        builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        if builtin == schema.BuiltinOperator.CUSTOM:
            names.append(f"CUSTOM:{(code.CustomCode() or b'?').decode()}")
        else:
            names.append(_BUILTIN_NAMES.get(builtin, f"BUILTIN_{builtin}"))
    return names


def non_builtin_ops(model: bytes) -> list[str]:
    """The Flex and custom ops of the model (empty for a LiteRT-only model)."""
    return [n.split(":", 1)[1] for n in operator_names(model) if n.startswith("CUSTOM:")]


def assert_builtin_only(model: bytes, what: str = "model") -> list[str]:
    """Raise `UnsupportedOpError` naming every Flex/custom op; return the op names otherwise."""
    bad = non_builtin_ops(model)
    if bad:
        raise UnsupportedOpError(bad, what)
    return operator_names(model)


def signatures(model: bytes) -> dict[str, dict]:
    """{signature: {"inputs": {name: {shape, dtype}}, "outputs": {...}}} as the interpreter sees them."""
    from ai_edge_litert.interpreter import Interpreter

    return interpreter_signatures(Interpreter(model_content=model))


def interpreter_signatures(interpreter) -> dict[str, dict]:
    """`signatures` of an already-loaded `ai_edge_litert.interpreter.Interpreter`."""
    out = {}
    for key in sorted(interpreter.get_signature_list()):
        runner = interpreter.get_signature_runner(key)
        out[key] = {side: {name: {"shape": [int(d) for d in detail["shape"]],
                                  "dtype": detail["dtype"].__name__}
                           for name, detail in sorted(details.items())}
                    for side, details in (("inputs", runner.get_input_details()),
                                          ("outputs", runner.get_output_details()))}
    return out


def constant_buffers(model: bytes) -> list[dict]:
    """The model's constant data, largest first: bytes, and the tensors (name, shape, dtype) sharing it.

    This is how to see whether a weight is stored twice, or in float where int8 was meant.
    """
    root = schema.Model.GetRootAsModel(model, 0)
    users: dict[int, list[dict]] = {}
    for g in range(root.SubgraphsLength()):
        graph = root.Subgraphs(g)
        for t in range(graph.TensorsLength()):
            tensor = graph.Tensors(t)
            users.setdefault(tensor.Buffer(), []).append({
                "name": tensor.Name().decode(), "dtype": _TYPE_NAMES.get(tensor.Type(), "?"),
                "shape": tensor.ShapeAsNumpy().tolist() if tensor.ShapeLength() else []})
    found = []
    for b in range(root.BuffersLength()):
        buffer = root.Buffers(b)
        size = buffer.DataLength() or buffer.Size()   # inline data, or data stored after the flatbuffer
        if size:
            found.append({"bytes": int(size), "tensors": users.get(b, [])})
    return sorted(found, key=lambda c: -c["bytes"])


def describe(model: bytes, constants: int = 8) -> dict:
    """Size, operators, Flex/custom ops, signatures and largest constants: what `inspect` prints."""
    return {"bytes": len(model), "ops": operator_names(model),
            "non_builtin_ops": non_builtin_ops(model), "signatures": signatures(model),
            "largest_constants": constant_buffers(model)[:constants]}
