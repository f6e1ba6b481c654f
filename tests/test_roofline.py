"""The roofline's work counts come from the graph: FLOP per operation from its shapes, and the weights a decoder
step reads (not those behind the cross-attention state's initialiser, which runs once per request)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

ROOFLINE = Path(__file__).resolve().parent.parent / "benchmarks" / "roofline.py"


@pytest.fixture(scope="module")
def roofline():
    spec = importlib.util.spec_from_file_location("florence2_roofline", ROOFLINE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _weight(*shape):
    from openvino import opset13 as ops

    return ops.constant(np.random.default_rng(0).standard_normal(shape).astype(np.float32))


def test_flops_of_matmuls_and_convolutions_follow_their_shapes(roofline):
    import openvino as ov
    from openvino import opset13 as ops

    image = ops.parameter(ov.PartialShape([-1, 3, -1, -1]), ov.Type.f32, name="image")
    conv = ops.convolution(image, _weight(8, 3, 3, 3), [1, 1], [1, 1], [1, 1], [1, 1])  # -> [1, 8, 16, 16]
    depthwise = ops.group_convolution(conv, _weight(8, 1, 1, 3, 3), [1, 1], [1, 1], [1, 1], [1, 1])
    tokens = ops.reshape(depthwise, ops.constant(np.array([1, 8, 256], np.int64)), False)
    mixed = ops.matmul(tokens, _weight(256, 32), False, False)  # [1, 8, 256] @ [256, 32]
    attention = ops.matmul(mixed, mixed, False, True)  # activations by activations: [1, 8, 32] @ [1, 32, 8]
    model = ov.Model([attention], [image])
    gflop = roofline.graph_gflop(model, {"image": [1, 3, 16, 16]})
    assert gflop["Convolution"] * 1e9 == pytest.approx(2 * 8 * 16 * 16 * 3 * 3 * 3)
    assert gflop["GroupConvolution"] * 1e9 == pytest.approx(2 * 8 * 16 * 16 * 3 * 3)
    assert gflop["MatMul"] * 1e9 == pytest.approx(2 * 8 * 32 * 256 + 2 * 8 * 8 * 32)
    assert gflop["total"] == pytest.approx(gflop["Convolution"] + gflop["GroupConvolution"] + gflop["MatMul"])


def test_a_decoder_step_reads_its_weights_but_not_the_state_initialisers(roofline):
    import openvino as ov
    from openvino import opset13 as ops
    from openvino.op.util import Variable, VariableInfo

    token = ops.parameter(ov.PartialShape([1, 1, 16]), ov.Type.f32, name="token")
    memory = ops.parameter(ov.PartialShape([1, -1, 16]), ov.Type.f32, name="memory")
    keys = ops.matmul(memory, _weight(16, 16), False, False)  # once per request: behind the ReadValue
    info = VariableInfo()
    info.data_shape, info.data_type, info.variable_id = ov.PartialShape([1, -1, 16]), ov.Type.f32, "cross"
    variable = Variable(info)
    state = ops.read_value(keys, variable)
    query = ops.matmul(token, _weight(16, 16), False, False)  # per step
    scores = ops.matmul(query, state, False, True)
    logits = ops.matmul(query, _weight(16, 100), False, False)  # per step
    model = ov.Model([scores.output(0), logits.output(0)], [ops.assign(state, variable)], [token, memory])
    step = roofline.decoder_step_weights(model)
    assert step["weight_elements"] == 16 * 16 + 16 * 100
    assert step["weight_bytes"] == 4 * (16 * 16 + 16 * 100)
    assert step["gflop"] * 1e9 == pytest.approx(2 * (16 * 16 + 16 * 100))


def test_the_tiny_decoders_step_weights_match_its_architecture(roofline, tiny_model_dir, tmp_path):
    """Per layer and step: self-attention q, k, v, out (4·d²), cross-attention q and out (2·d²; its k and v
    project the encoder output once per request), the feed-forward pair (2·d·ffn); then the tied output projection."""
    from helpers.convert.conversion import convert_florence2

    folder = convert_florence2(tiny_model_dir, tmp_path / "fp32", "fp32", verbose=False)
    text = json.loads((folder / "config.json").read_text())["text_config"]
    d, ffn, layers, vocab = text["d_model"], text["decoder_ffn_dim"], text["decoder_layers"], text["vocab_size"]
    work = roofline.graph_work(folder, image_size=(768, 768), encoder_tokens=590)
    assert work["decoder_step"]["weight_elements"] == layers * (6 * d * d + 2 * d * ffn) + vocab * d
    assert work["vision"]["total"] > work["encoder"]["total"] > 0


def test_microbenchmarks_measure_an_int8_matmul(roofline):
    rates = roofline.microbenchmarks(1, quick=True)
    assert any(p.startswith(("u8", "i8")) for p in rates["matmul"]["int8"]["runtime_precision"]), rates["matmul"][
        "int8"
    ]
    for precision in ("f32", "bf16", "int8"):
        assert rates["matmul"][precision]["gflops"] > 0
    assert rates["int8_weight_stream"]["gb_per_s"] > 0 and rates["copy_beyond_cache"]["gb_per_s"] > 0


def test_the_vision_profile_names_the_kernels_that_took_the_time(roofline, tiny_model_dir, tmp_path):
    """PERF_COUNT's per-node times, summed per (operation, kernel): the convolutions and matrix products are there,
    with the kernel the CPU plugin chose, and the shares add up to at most the whole."""
    from transformers import AutoProcessor

    from helpers.convert.conversion import convert_florence2, image_size_of

    folder = convert_florence2(tiny_model_dir, tmp_path / "fp32", "fp32", verbose=False)
    image_size = image_size_of(AutoProcessor.from_pretrained(folder))
    profile = roofline.vision_profile(folder, 1, image_size=image_size, repeats=2, top=50)
    operations = {row["operation"] for row in profile["top"]}
    assert {"Convolution", "MatMul"} & operations or "FullyConnected" in operations, operations
    assert all(row["kernel"] and row["ms"] >= 0 for row in profile["top"])
    assert 0 < sum(row["share"] for row in profile["top"]) <= 1 + 1e-9
    assert profile["wall_ms"] > 0
