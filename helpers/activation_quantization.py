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
* :func:`compress_w8a8` — what :func:`helpers.conversion.convert_florence2` calls for each part in ``w8a8``.

The accuracy gate (every teaching-model task within 0.02 of fp16) is :func:`accuracy_gate`; the command
``python -m helpers.activation_quantization gate`` measures it and can record the ``w8a8`` row in the teaching
model's ``quality.json``. Taught in ``notebooks/11_speed.ipynb``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

WEIGHT_FORMAT = "w8a8"
#: Shipped samples in the calibration set (every photo and generated document; not the held-out teaching scene).
CALIBRATION_SAMPLES: tuple[str, ...] = ("grace_hopper", "pagoda", "flower", "text", "receipt", "shapes")
#: Generated teaching scenes in the calibration set, and the seed of their stream: neither the training seeds
#: (0, 1, 2, …) nor :data:`helpers.teaching.scenes.HELD_OUT_SEED`, so evaluation never sees a calibration scene.
CALIBRATION_SCENES = 26
CALIBRATION_SEED = 7_000_001
#: SmoothQuant's migration strength for the matrix products (nncf's transformer default is 0.95).
SMOOTH_QUANT_ALPHA = 0.95
#: Vision-encoder operations kept in higher precision, as nncf name patterns (regular expressions over IR node
#: names). Empty: the accuracy gate holds with every matrix product quantized (``quality.json``, ``w8a8`` row).
SENSITIVE_LAYERS: tuple[str, ...] = ()
#: Largest tolerated drop of any teaching-model quality metric against fp16 (issue #16).
GATE_TOLERANCE = 0.02


class CalibrationError(ValueError):
    """The calibration set cannot calibrate this model; the message says what to pass instead."""


def calibration_images(scenes: int | None = None) -> list:
    """The shipped samples of :data:`CALIBRATION_SAMPLES` and ``scenes`` (default :data:`CALIBRATION_SCENES`)
    generated teaching scenes, as PIL images."""
    from helpers.samples import load_sample
    from helpers.teaching.scenes import training_scene

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


# ----------------------------------------------------------------------------------------------------------------
# The accuracy gate on the teaching model


def accuracy_gate(reference: dict[str, float], candidate: dict[str, float], tolerance: float = GATE_TOLERANCE) -> dict:
    """Every metric of :data:`helpers.teaching.quality.METRICS`: the reference's value (fp16), the candidate's
    (w8a8), the difference and whether it is within ``tolerance`` below; ``passed`` when all are."""
    from helpers.teaching.quality import METRICS

    rows = {}
    for key in METRICS:
        difference = candidate[key] - reference[key]
        rows[key] = {"reference": reference[key], "candidate": candidate[key], "difference": difference,
                     "ok": difference >= -tolerance - 1e-9}  # fmt: skip (0.54 - 0.56 is -0.0200…02 in floats)
    return {"tolerance": tolerance, "passed": all(row["ok"] for row in rows.values()), "metrics": rows}


def format_gate(gate: dict, reference: str = "fp16", candidate: str = WEIGHT_FORMAT) -> str:
    """The gate as a Markdown table, one row per metric."""
    from helpers.teaching.quality import METRICS

    lines = [f"| metric | {reference} | {candidate} | difference | within {gate['tolerance']} |", "|---|---|---|---|---|"]
    for key, row in gate["metrics"].items():
        lines.append(f"| {METRICS[key]} | {row['reference']:.3f} | {row['candidate']:.3f} | {row['difference']:+.3f} "
                     f"| {'yes' if row['ok'] else '**no**'} |")  # fmt: skip
    lines.append(f"\nGate {'PASSED' if gate['passed'] else 'FAILED'}: every metric within {gate['tolerance']} below {reference}.")
    return "\n".join(lines)


def measure_gate(model_dir: Path, *, scenes: int = 100, reference: str = "fp16", measure_reference: bool = False,
                 quality_json: Path | None = None, progress=None) -> dict:  # fmt: skip
    """Evaluate ``w8a8`` on the teaching model's held-out scenes exactly as ``helpers.teaching.quality`` evaluates
    fp16/int8 (same scenes, one thread, the model's generation settings), and compare with the ``reference``
    backend: measured here too with ``measure_reference``, else read from ``quality_json``."""
    from helpers.teaching.quality import measure

    backends = [reference, WEIGHT_FORMAT] if measure_reference else [WEIGHT_FORMAT]
    report = measure(model_dir, scenes=scenes, backends=backends, progress=progress)
    if measure_reference:
        reference_metrics = report["results"][reference]
    else:
        recorded = json.loads(Path(quality_json).read_text())
        if recorded.get("scenes") != scenes:
            raise ValueError(f"{quality_json} was measured on {recorded.get('scenes')} scenes, not {scenes}: pass "
                             f"--scenes {recorded.get('scenes')} or --measure-reference.")  # fmt: skip
        reference_metrics = recorded["results"][reference]
    report["gate"] = accuracy_gate(reference_metrics, report["results"][WEIGHT_FORMAT])
    return report


def record_quality_row(quality_json: Path, w8a8_metrics: dict) -> None:
    """Put the ``w8a8`` row into the teaching model's ``quality.json`` (the other rows are left as they are); the
    file is replaced atomically."""
    report = json.loads(quality_json.read_text())
    report["results"][WEIGHT_FORMAT] = w8a8_metrics
    partial = quality_json.with_name(quality_json.name + ".partial")
    partial.write_text(json.dumps(report, indent=2) + "\n")
    partial.replace(quality_json)


# ----------------------------------------------------------------------------------------------------------------
# Vision features against PyTorch FP32 (the check for models without a task metric, e.g. random weights)


#: Images the feature comparison uses: the photos and documents, and held-out teaching scenes (not calibration ones).
SIMILARITY_SAMPLES: tuple[str, ...] = ("grace_hopper", "pagoda", "flower", "text", "receipt", "shapes", "teaching_scene")


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def feature_similarity(source: str, weight_formats: Sequence[str], *, ov_config: dict | None = None) -> dict:
    """Cosine similarity of each format's vision features (OpenVINO, ``ov_config``: the CPU's defaults unless given)
    to PyTorch FP32's, per image of :data:`SIMILARITY_SAMPLES`, with the per-token minimum (the worst image token)."""
    import torch
    from transformers import AutoProcessor

    from helpers.conversion import load_torch_model
    from helpers.models import ensure_converted
    from helpers.ov_model import OVFlorence2Model
    from helpers.samples import load_sample

    processor = AutoProcessor.from_pretrained(source)
    images = {name: load_sample(name) for name in SIMILARITY_SAMPLES}
    pixels = {name: processor.image_processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"]
              for name, image in images.items()}  # fmt: skip
    model = load_torch_model(Path(source))
    with torch.no_grad():
        reference = {name: model.get_image_features(p).pooler_output[0].numpy() for name, p in pixels.items()}
    del model
    report: dict[str, Any] = {"source": source, "images": list(SIMILARITY_SAMPLES), "formats": {}}
    for weight_format in weight_formats:
        ov_model = OVFlorence2Model(ensure_converted(source, weight_format), "CPU", ov_config or {})
        per_image, worst_token = {}, {}
        for name, p in pixels.items():
            features = np.asarray(ov_model.image_features(p.numpy()))[0]
            per_image[name] = cosine(features, reference[name])
            token_cos = (features * reference[name]).sum(-1) / (
                np.linalg.norm(features, axis=-1) * np.linalg.norm(reference[name], axis=-1))
            worst_token[name] = float(token_cos.min())
        report["formats"][weight_format] = {"per_image": per_image, "mean": float(np.mean(list(per_image.values()))),
                                            "min": min(per_image.values()), "worst_token": min(worst_token.values())}  # fmt: skip
        del ov_model
    return report


def format_similarity(report: dict) -> str:
    lines = ["| weight format (CPU defaults) | mean cosine to PyTorch FP32 | lowest image | lowest single token |",
             "|---|---|---|---|"]  # fmt: skip
    for weight_format, r in report["formats"].items():
        lines.append(f"| {weight_format} | {r['mean']:.4f} | {r['min']:.4f} | {r['worst_token']:.4f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Only the answer (JSON) on standard output; progress, nncf's bars and the tables on standard error."""
    import contextlib

    answer_stream = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):
        return _run(argv, answer_stream)


def _run(argv: list[str] | None, answer_stream) -> int:
    from helpers.teaching import TEACHING_MODEL_DIR

    parser = argparse.ArgumentParser(prog="python -m helpers.activation_quantization",
                                     description="The w8a8 accuracy gate on the teaching model.")  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True)
    gate = sub.add_parser("gate", help="evaluate w8a8 on held-out scenes and compare every metric with fp16")
    gate.add_argument("--model", type=Path, default=TEACHING_MODEL_DIR)
    gate.add_argument("--scenes", type=int, default=100)
    gate.add_argument("--measure-reference", action="store_true", help="measure fp16 in the same run too")
    gate.add_argument("--write-quality", action="store_true", help="record the w8a8 row in the model's quality.json")
    gate.add_argument("--json", type=Path, default=None, help="write the whole report (and the gate) here")
    similarity = sub.add_parser("similarity", help="vision features of each format against PyTorch FP32 (cosine)")
    similarity.add_argument("--model", default="base-random", help="a model folder or a name resolve_model knows")
    similarity.add_argument("--formats", nargs="+", default=["fp16", "int8", WEIGHT_FORMAT])
    similarity.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.command == "similarity":
        from helpers.models import resolve_model

        result = feature_similarity(resolve_model(args.model), args.formats)
        result["model"] = args.model
        print(format_similarity(result), file=sys.stderr)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps({name: r["mean"] for name, r in result["formats"].items()}), file=answer_stream)
        return 0
    quality_json = args.model / "quality.json"
    report = measure_gate(args.model, scenes=args.scenes, measure_reference=args.measure_reference,
                          quality_json=quality_json, progress=lambda line: print(line, file=sys.stderr, flush=True))  # fmt: skip
    print(format_gate(report["gate"]), file=sys.stderr)
    if args.write_quality:
        record_quality_row(quality_json, report["results"][WEIGHT_FORMAT])
        print(f"recorded the w8a8 row in {quality_json}", file=sys.stderr)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({"passed": report["gate"]["passed"], "json": str(args.json) if args.json else None}), file=answer_stream)
    return 0 if report["gate"]["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
