"""The plan must be LiteRT built-ins only: the converter refuses Flex ops and names them."""
from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from tflite_export.convert import convert
from tflite_export.errors import UnsupportedOpError
from tflite_export.modelinfo import assert_builtin_only, non_builtin_ops


def sliced_gradient_module():
    """A module whose signature differentiates a slice: StridedSliceGrad, a Flex-only op."""
    module = tf.Module()
    module.v = tf.Variable(np.arange(24, dtype=np.float32).reshape(2, 3, 4))

    @tf.function(input_signature=[tf.TensorSpec([], tf.float32, "scale")])
    def grad(scale):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(module.v[:, 1, :] * scale)
        return {"grad": tape.gradient(loss, module.v)}

    return module, grad


def test_export_refuses_flex_ops_and_names_them():
    module, grad = sliced_gradient_module()
    with pytest.raises(UnsupportedOpError, match="StridedSliceGrad") as err:
        convert(module, {"grad": grad.get_concrete_function()}, what="test graph",
                resource_variables=True)
    assert "test graph" in str(err.value)


def test_flatbuffer_check_names_a_flex_op_that_got_in():
    module, grad = sliced_gradient_module()
    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [grad.get_concrete_function()], module)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS,
                                           tf.lite.OpsSet.SELECT_TF_OPS]
    converter.experimental_enable_resource_variables = True
    model = converter.convert()
    assert non_builtin_ops(model) == ["FlexStridedSliceGrad"]
    with pytest.raises(UnsupportedOpError, match="FlexStridedSliceGrad"):
        assert_builtin_only(model, "plan")
