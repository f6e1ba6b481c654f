"""The ``w8a8`` weight format: INT8 weights everywhere, plus static INT8 activations in the vision encoder.

INT8 weights alone (``int8``) halve the bytes a decoder step reads, but every matrix product still runs in bf16
(or f32): the weights are decompressed first. The vision encoder is the one part whose time goes into arithmetic
rather than into reading weights (≈350 GFLOP per 768×768 image on Florence-2-base, see ``benchmarks/roofline.py``),
and this CPU does about twice the INT8 multiply-adds per cycle (VNNI) as bf16 ones. Running its matrix products on
INT8 activations needs a scale for every activation, which post-training quantization measures on a calibration set:

* :func:`calibration_images` — the shipped samples (photos, text, receipts) and generated teaching scenes, so the
  ranges cover both what real users show and what the teaching model knows;
* :func:`calibration_pixels` — those images through the model's own processor, at the model's input size;
* :func:`quantize_vision_encoder` — ``nncf.quantize`` with its transformer settings (``ModelType.TRANSFORMER``,
  SmoothQuant on the matrix products, fast bias correction) and :data:`SENSITIVE_LAYERS` left in higher precision;
* :func:`compress_w8a8` — what :func:`helpers.convert.conversion.convert_florence2` calls for each part in ``w8a8``.

The accuracy gate (every teaching-model task within 0.02 of fp16) lives with the teaching model, in
:mod:`helpers.course.w8a8_gate` (``python -m helpers.course.w8a8_gate gate``). Taught in ``notebooks/11_speed.ipynb``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

WEIGHT_FORMAT = "w8a8"
#: Shipped samples in the calibration set (every photo and generated document; not the held-out teaching scene).
CALIBRATION_SAMPLES: tuple[str, ...] = ("grace_hopper", "pagoda", "flower", "text", "receipt", "shapes")
#: Generated teaching scenes in the calibration set, and the seed of their stream: neither the training seeds
#: (0, 1, 2, …) nor :data:`helpers.course.teaching.scenes.HELD_OUT_SEED`, so evaluation never sees a calibration scene.
CALIBRATION_SCENES = 26
CALIBRATION_SEED = 7_000_001
#: SmoothQuant's migration strength for the matrix products (nncf's transformer default is 0.95).
SMOOTH_QUANT_ALPHA = 0.95
#: Vision-encoder operations kept in higher precision, as nncf name patterns (regular expressions over IR node
#: names). Empty: every matrix product is quantized. On teaching model v4 the accuracy gate keeps 26 of 27 metrics
#: within 0.02 of fp16; ``<OCR_WITH_REGION>`` is 0.04 behind (2 of 48 scenes; ``quality.json``'s ``w8a8`` row and
#: ``benchmarks/README.md`` have the numbers).
SENSITIVE_LAYERS: tuple[str, ...] = ()


class CalibrationError(ValueError):
    """The calibration set cannot calibrate this model; the message says what to pass instead."""


def calibration_images(scenes: int | None = None) -> list:
    """The shipped samples of :data:`CALIBRATION_SAMPLES` and ``scenes`` (default :data:`CALIBRATION_SCENES`)
    generated teaching scenes, as PIL images."""
    # The one import of the course layer from convert/ (pyproject.toml lists it): the calibration set is lesson data.
    from helpers.course.samples import load_sample
    from helpers.course.teaching.scenes import training_scene

    scenes = CALIBRATION_SCENES if scenes is None else scenes
    images = [load_sample(name) for name in CALIBRATION_SAMPLES]
    return images + [training_scene(CALIBRATION_SEED, index).image for index in range(scenes)]


def calibration_pixels(processor: Any, images: Sequence[Any]) -> list[np.ndarray]:
    """Each image as the vision encoder sees it: ``[1, 3, height, width]`` float32 from the model's own
    ``processor`` (its resize, rescale and normalisation, at its input size)."""
    from PIL import Image

    if not images:
        raise CalibrationError("The calibration set is empty. Pass at least one image (PIL.Image).")
    wrong = [type(image).__name__ for image in images if not isinstance(image, Image.Image)]
    if wrong:
        raise CalibrationError(
            f"Calibration images must be PIL images; got {', '.join(sorted(set(wrong)))}. Open files with "
            "PIL.Image.open(path).convert('RGB') first."
        )
    return [
        processor.image_processor(images=image.convert("RGB"), return_tensors="np")["pixel_values"].astype(np.float32)
        for image in images
    ]


def _check_pixels(ov_model: Any, pixels: Sequence[Any]) -> None:
    """Refuse a calibration set that does not fit the vision encoder's input, before nncf starts (it would fail
    deep inside statistics collection, or worse, calibrate on garbage)."""
    if not pixels:
        raise CalibrationError("The calibration set is empty. Pass at least one [1, 3, H, W] pixel array.")
    expected = ov_model.input(0).get_partial_shape()
    height, width = expected[2].get_length(), expected[3].get_length()
    for index, array in enumerate(pixels):
        if not isinstance(array, np.ndarray) or array.dtype != np.float32:
            raise CalibrationError(
                f"Calibration item {index} is a {type(array).__name__} of {getattr(array, 'dtype', '?')}, not a "
                "float32 numpy array. Build the set with calibration_pixels(processor, images)."
            )
        if array.ndim != 4 or tuple(array.shape[1:]) != (3, height, width):
            raise CalibrationError(
                f"Calibration item {index} has shape {list(array.shape)}; this vision encoder takes "
                f"[batch, 3, {height}, {width}]. Preprocess the images with the model's own processor "
                "(calibration_pixels(processor, images)), which resizes them to the model's input size."
            )
        if not np.isfinite(array).all():
            raise CalibrationError(f"Calibration item {index} holds NaN or infinite values; it would set no range.")


def quantize_vision_encoder(
    ov_model: Any,
    pixels: Sequence[np.ndarray],
    *,
    ignored_patterns: Sequence[str] | None = None,
    smooth_quant_alpha: float = SMOOTH_QUANT_ALPHA,
    fast_bias_correction: bool = True,
) -> Any:
    """Static INT8 activations and weights for the vision encoder's matrix products and convolutions.

    ``pixels`` is the calibration set (:func:`calibration_pixels`). ``ignored_patterns`` keeps matching operations
    (nncf regular expressions over node names; default :data:`SENSITIVE_LAYERS`) in higher precision; their weights
    are then compressed to INT8 like the ``int8`` format's, so no weight stays in float."""
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters

    _check_pixels(ov_model, pixels)
    ignored_patterns = SENSITIVE_LAYERS if ignored_patterns is None else ignored_patterns
    ignored = nncf.IgnoredScope(patterns=list(ignored_patterns), validate=False) if ignored_patterns else None
    advanced = AdvancedQuantizationParameters(
        smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=smooth_quant_alpha)
    )
    quantized = nncf.quantize(
        ov_model,
        nncf.Dataset(list(pixels)),
        model_type=nncf.ModelType.TRANSFORMER,
        subset_size=len(pixels),
        fast_bias_correction=fast_bias_correction,
        ignored_scope=ignored,
        advanced_parameters=advanced,
    )
    if ignored_patterns:  # what stayed in float gets INT8 weights (operations already quantized are skipped)
        quantized = nncf.compress_weights(quantized, mode=nncf.CompressWeightsMode.INT8_ASYM)
    return quantized


def compress_w8a8(ov_model: Any, part: str, processor: Any, verbose: bool = False) -> Any:
    """One part in ``w8a8``: the vision encoder quantized on :func:`calibration_images` preprocessed by
    ``processor``; the text encoder and decoder with INT8 weights (their time goes into reading weights, or their
    inputs are too few rows for static activation ranges to pay)."""
    import nncf

    if part != "vision_encoder":
        return nncf.compress_weights(ov_model, mode=nncf.CompressWeightsMode.INT8_ASYM)
    images = calibration_images()
    if verbose:
        print(f"   calibrating the vision encoder's INT8 activations on {len(images)} images", flush=True)
    return quantize_vision_encoder(ov_model, calibration_pixels(processor, images))


def count_quantized_operations(ov_model: Any) -> dict[str, int]:
    """``{"FakeQuantize": n, "MatMul": m, "Convolution": c, "quantized_inputs": q}``: how much of a graph reads
    INT8 activations (an operation whose data input comes through a ``FakeQuantize``)."""
    counts = {"FakeQuantize": 0, "MatMul": 0, "Convolution": 0, "quantized_inputs": 0}
    for op in ov_model.get_ordered_ops():
        kind = op.get_type_name()
        if kind in counts:
            counts[kind] += 1
        if kind in ("MatMul", "Convolution", "GroupConvolution"):
            if op.input_value(0).get_node().get_type_name() == "FakeQuantize":
                counts["quantized_inputs"] += 1
    return counts
