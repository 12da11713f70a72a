"""One way to turn a tf.Module into a LiteRT flatbuffer: built-in ops only, or nothing.

Both artifacts go through `convert`: the module is saved as a SavedModel with
named signatures (the documented route for multi-signature models with
variables), converted with `TFLITE_BUILTINS` as the only op set, and the
result's operator codes are checked again (`modelinfo.assert_builtin_only`),
so a Flex or custom op stops the export with an error that names it.
"""
from __future__ import annotations

import re
import tempfile

import tensorflow as tf

from tflite_export.errors import ExportError, UnsupportedOpError
from tflite_export.modelinfo import assert_builtin_only

_SELECT_OPS = re.compile(r"TF Select ops: ([^\n]+)")
_CUSTOM_OPS = re.compile(r"Custom ops: ([^\n]+)")


def convert(module: tf.Module, signatures: dict, *, what: str,
            resource_variables: bool = False) -> bytes:
    """SavedModel of `module` with `signatures` → .tflite bytes (TFLITE_BUILTINS only, float weights: the
    app model's are stored small afterwards by tflite_export.compact).

    resource_variables keeps tf.Variables as LiteRT variables (the training
    plan).
    """
    with tempfile.TemporaryDirectory(prefix="nightjar-savedmodel-") as saved:
        tf.saved_model.save(module, saved, signatures=signatures)
        converter = tf.lite.TFLiteConverter.from_saved_model(saved, signature_keys=list(signatures))
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        converter.experimental_enable_resource_variables = resource_variables
        try:
            model = converter.convert()
        except Exception as e:  # the converter raises ConverterError, whose module is private
            text = str(e)
            ops = [op.strip() for m in (_SELECT_OPS.search(text), _CUSTOM_OPS.search(text)) if m
                   for op in m.group(1).split(",")]
            if ops:
                raise UnsupportedOpError(ops, what) from None
            raise ExportError(f"converting the {what} failed: {text.strip()[-2000:]}") from e
    assert_builtin_only(model, what)
    return model
