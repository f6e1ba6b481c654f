"""INT4 group size comes from the widths INT4 groups actually run along (a weight's input axis)."""

from __future__ import annotations

import numpy as np
import pytest


def int4_group_sizes(ov_model) -> set[int]:
    """Group sizes of the INT4 weights NNCF wrote: each is stored as [outputs, groups, group size] (its zero points
    as [outputs, groups, 1])."""
    import openvino as ov

    sizes = {
        int(op.get_output_partial_shape(0)[-1].get_length())
        for op in ov_model.get_ordered_ops()
        if op.get_type_name() == "Constant" and op.get_output_element_type(0) in (ov.Type.u4, ov.Type.i4)
    }
    return sizes - {1}


def test_an_odd_vocabulary_does_not_shrink_the_decoders_int4_groups(tmp_path):
    """Vocabulary 51,290 (unpadded, or a fine-tune with added tokens) is the output width of the tied projection;
    it must not pull every decoder layer down to group size 8. The tiny model's layers are 64 wide, so 64 fits."""
    pytest.importorskip("nncf")
    from transformers import Florence2ForConditionalGeneration

    from helpers.convert.conversion import compress, convert_decoder
    from helpers.course.tiny import make_tiny_florence2

    folder = make_tiny_florence2(tmp_path / "tiny-51290", vocab_size=51290, weight_std=None, eos_pull=None)
    model = Florence2ForConditionalGeneration.from_pretrained(folder).eval()
    assert model.config.text_config.vocab_size == 51290 and model.config.text_config.d_model == 64
    compressed = compress(convert_decoder(model), "decoder", "int4", verbose=False)
    assert int4_group_sizes(compressed) == {64}


def test_group_size_counts_input_widths_only():
    import openvino as ov
    from openvino import opset13 as ops

    from helpers.convert.conversion import compress

    pytest.importorskip("nncf")
    hidden = ops.parameter(ov.PartialShape([-1, -1, 768]), ov.Type.f32)
    rng = np.random.default_rng(0)

    def weight(*shape):
        return ops.constant(rng.standard_normal(shape).astype(np.float32))

    up = ops.matmul(hidden, weight(3072, 768), False, True)  # nn.Linear layout: [out, in], transposed
    down = ops.matmul(up, weight(3072, 768), False, False)  # [in, out]: input width 3072
    logits = ops.matmul(down, weight(51290, 768), False, True)  # the output projection: vocabulary as output width
    model = ov.Model([logits], [hidden])
    # Weights stored [in, out] keep their output width last ([groups, group size, out]): 768 here is not a group.
    assert int4_group_sizes(compress(model, "decoder", "int4", verbose=False)) == {128, 768}
