"""The w8a8 format: INT8 weights everywhere, static INT8 activations in the vision encoder
(:mod:`helpers.convert.activation_quantization`), on a tiny model at a small input size so calibration takes seconds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("nncf")


@pytest.fixture(scope="module")
def small_model_dir(tmp_path_factory) -> Path:
    from helpers.course.tiny import make_tiny_florence2

    # transformers' default init (as base-random): activation scales like a real model's, unlike the wide test weights
    return make_tiny_florence2(tmp_path_factory.mktemp("w8a8") / "tiny-64px", image_size=64, weight_std=None,
                               eos_pull=None)  # fmt: skip


@pytest.fixture(scope="module")
def models_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("w8a8-cache")


@pytest.fixture(scope="module")
def w8a8_dir(small_model_dir, models_cache) -> Path:
    """The small model converted to w8a8 where ``load_model`` looks for it (``models_cache``)."""
    import helpers.convert.activation_quantization as aq
    from helpers.convert.conversion import convert_florence2
    from helpers.course.checkpoints import converted_dir

    patch = pytest.MonkeyPatch()
    patch.setattr(aq, "CALIBRATION_SCENES", 4)  # a smaller calibration set: the same code path, seconds not minutes
    try:
        folder = converted_dir(str(small_model_dir), "w8a8", models_cache)
        return convert_florence2(small_model_dir, folder, "w8a8", verbose=False)
    finally:
        patch.undo()


def _read(folder: Path, part: str):
    import openvino as ov

    return ov.Core().read_model(folder / f"{part}.xml")


def test_the_vision_encoder_reads_int8_activations(w8a8_dir):
    from helpers.convert.activation_quantization import count_quantized_operations

    vision = count_quantized_operations(_read(w8a8_dir, "vision_encoder"))
    assert vision["FakeQuantize"] > 0
    # every weighted matrix product and convolution (and the activation-by-activation attention products) reads
    # quantized data: at least as many as the graph's convolutions plus half its matmuls
    assert vision["quantized_inputs"] >= vision["Convolution"] + vision["MatMul"] // 2, vision


def test_the_text_parts_have_int8_weights_and_float_activations(w8a8_dir):
    import openvino as ov

    for part in ("encoder", "decoder"):
        model = _read(w8a8_dir, part)
        kinds = {op.get_type_name() for op in model.get_ordered_ops()}
        weights = [op for op in model.get_ordered_ops() if op.get_type_name() == "Constant"
                   and op.get_output_element_type(0) in (ov.Type.u8, ov.Type.i8)]  # fmt: skip
        assert "FakeQuantize" not in kinds, part
        assert weights, f"{part} has no INT8 weights"


def test_manifest_and_model_load_and_answer(w8a8_dir, small_model_dir):
    """The converted folder is a complete w8a8 conversion; it loads and its image features stay close to PyTorch's
    (a calibration that set wrong ranges would not), and generation answers."""
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from helpers.ir import is_converted
    from helpers.runtime.ov_model import OVFlorence2Model
    from helpers.course.samples import load_sample

    assert is_converted(w8a8_dir, weight_format="w8a8")
    processor = AutoProcessor.from_pretrained(w8a8_dir)
    model = OVFlorence2Model(w8a8_dir, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    torch_model = AutoModelForImageTextToText.from_pretrained(small_model_dir).eval()
    cosines = []
    for image in (load_sample("pagoda"), load_sample("shapes")):
        pixels = processor(text="<OD>", images=image, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            reference = torch_model.get_image_features(pixels).pooler_output.numpy().ravel()
        features = np.asarray(model.image_features(pixels.numpy())).ravel()
        cosines.append(float(features @ reference / np.linalg.norm(features) / np.linalg.norm(reference)))
    assert min(cosines) > 0.95, cosines
    inputs = processor(text="<CAPTION>", images=Image.new("RGB", (80, 60), "teal"), return_tensors="pt")
    tokens = model.generate(**inputs, max_new_tokens=6, num_beams=1)
    assert tokens.shape[-1] > 1


@pytest.fixture(scope="module")
def float_vision_encoder(small_model_dir):
    from helpers.convert.conversion import convert_vision_encoder, load_torch_model

    return convert_vision_encoder(load_torch_model(small_model_dir), (64, 64))


@pytest.mark.parametrize(
    ("pixels", "message"),
    [
        ([], "empty"),
        ([np.zeros((1, 3, 32, 32), np.float32)], "[batch, 3, 64, 64]"),
        ([np.zeros((3, 64, 64), np.float32)], "[batch, 3, 64, 64]"),
        ([np.zeros((1, 3, 64, 64), np.float64)], "float32"),
        ([np.full((1, 3, 64, 64), np.nan, np.float32)], "NaN"),
    ],
)
def test_bad_calibration_input_is_refused_with_what_to_pass(float_vision_encoder, pixels, message):
    import re

    from helpers.convert.activation_quantization import CalibrationError, quantize_vision_encoder

    with pytest.raises(CalibrationError, match=re.escape(message)):
        quantize_vision_encoder(float_vision_encoder, pixels)


def test_calibration_images_must_be_pictures(w8a8_dir):
    from PIL import Image
    from transformers import AutoProcessor

    from helpers.convert.activation_quantization import CalibrationError, calibration_pixels

    processor = AutoProcessor.from_pretrained(w8a8_dir)
    with pytest.raises(CalibrationError, match="PIL images; got str"):
        calibration_pixels(processor, ["photo.jpg"])
    with pytest.raises(CalibrationError, match="empty"):
        calibration_pixels(processor, [])
    pixels = calibration_pixels(processor, [Image.new("RGB", (300, 120), "red")])
    assert pixels[0].shape == (1, 3, 64, 64) and pixels[0].dtype == np.float32  # the model's own input size


def test_the_gate_fails_on_any_metric_more_than_the_tolerance_below():
    from helpers.course.w8a8_gate import accuracy_gate
    from helpers.course.teaching.quality import METRICS

    reference = dict.fromkeys(METRICS, 0.8)
    assert accuracy_gate(reference, dict.fromkeys(METRICS, 0.79))["passed"]
    assert accuracy_gate(dict.fromkeys(METRICS, 0.56), dict.fromkeys(METRICS, 0.54))["passed"]  # exactly 0.02 below
    assert accuracy_gate(reference, dict.fromkeys(METRICS, 0.9))["passed"]  # better is never a failure
    worse = {**reference, "od_map50": 0.77}
    gate = accuracy_gate(reference, worse)
    assert not gate["passed"] and not gate["metrics"]["od_map50"]["ok"]
    assert [key for key, row in gate["metrics"].items() if not row["ok"]] == ["od_map50"]


def test_the_command_line_answers_with_w8a8(w8a8_dir, small_model_dir, models_cache, monkeypatch, capsys):
    import json

    from helpers.cli.main import main
    from helpers.course.samples import sample_path

    monkeypatch.setenv("FLORENCE2_MODELS_DIR", str(models_cache))  # where w8a8_dir was converted: reused, not redone
    code = main([str(sample_path("shapes")), "--model", str(small_model_dir), "--weight-format", "w8a8",
                 "--device", "CPU", "--max-new-tokens", "4", "--num-beams", "1"])  # fmt: skip
    assert code == 0
    assert "<CAPTION>" in json.loads(capsys.readouterr().out)


def test_a_classroom_kit_holds_a_w8a8_conversion(small_model_dir, tmp_path, monkeypatch):
    import helpers.convert.activation_quantization as aq
    from helpers.ir import read_manifest
    from helpers.course.kit import build_kit, find_in_kit

    monkeypatch.setattr(aq, "CALIBRATION_SCENES", 0)  # the six shipped samples only: seconds
    kit = build_kit(tmp_path / "kit", [str(small_model_dir)], ["w8a8"], include_samples=False)
    folder = find_in_kit(kit, str(small_model_dir), "w8a8")
    assert folder is not None and read_manifest(folder)["weight_format"] == "w8a8"


def test_sensitive_layers_stay_in_higher_precision_with_int8_weights(float_vision_encoder, w8a8_dir):
    import openvino as ov
    from PIL import Image
    from transformers import AutoProcessor

    from helpers.convert.activation_quantization import (
        calibration_pixels,
        count_quantized_operations,
        quantize_vision_encoder,
    )

    processor = AutoProcessor.from_pretrained(w8a8_dir)
    pixels = calibration_pixels(processor, [Image.new("RGB", (90, 70), colour) for colour in ("navy", "orange")])
    quantized = quantize_vision_encoder(float_vision_encoder.clone(), pixels, ignored_patterns=[r".*convs\.0\.conv.*"])
    stem = _stem(quantized)
    assert stem.input_value(0).get_node().get_type_name() != "FakeQuantize"  # float activations
    weight_types = {n.get_output_element_type(0) for n in _ancestor_constants(stem.input_value(1).get_node())}
    assert weight_types & {ov.Type.u8, ov.Type.i8}, weight_types  # but INT8 weights, as the int8 format has
    assert count_quantized_operations(quantized)["quantized_inputs"] > 0  # the rest is still quantized
    # without the pattern (the shipped conversion) the same convolution reads INT8 activations
    assert _stem(_read(w8a8_dir, "vision_encoder")).input_value(0).get_node().get_type_name() == "FakeQuantize"


def _stem(model):
    return next(op for op in model.get_ordered_ops() if op.get_type_name() == "Convolution"
                and "convs.0.conv" in op.get_friendly_name())  # fmt: skip


def _ancestor_constants(node) -> list:
    found, stack = [], [node]
    while stack:
        current = stack.pop()
        if current.get_type_name() == "Constant":
            found.append(current)
        stack.extend(value.get_node() for value in current.input_values())
    return found
