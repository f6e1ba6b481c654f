"""The ``w8a8`` format's accuracy gate on the teaching model, and its vision features against PyTorch FP32.

    python -m helpers.course.w8a8_gate gate --measure-reference --json build/w8a8-gate.json
    python -m helpers.course.w8a8_gate similarity --model base-random --json build/w8a8-similarity.json

The gate evaluates ``w8a8`` (:mod:`helpers.convert.activation_quantization`) on the teaching model's held-out scenes
exactly as :mod:`helpers.course.teaching.quality` evaluates fp16 and int8, and passes when every metric is within
:data:`GATE_TOLERANCE` below fp16. Random-weight models have no task metric, so for them the check is the cosine
similarity of the vision features to PyTorch FP32. Taught in ``notebooks/11_speed.ipynb``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from helpers.convert.activation_quantization import WEIGHT_FORMAT

#: Largest tolerated drop of any teaching-model quality metric against fp16 (issue #16).
GATE_TOLERANCE = 0.02


def accuracy_gate(reference: dict[str, float], candidate: dict[str, float], tolerance: float = GATE_TOLERANCE) -> dict:
    """Every metric of :data:`helpers.course.teaching.quality.METRICS`: the reference's value (fp16), the candidate's
    (w8a8), the difference and whether it is within ``tolerance`` below; ``passed`` when all are."""
    from helpers.course.teaching.quality import METRICS

    rows = {}
    for key in METRICS:
        difference = candidate[key] - reference[key]
        rows[key] = {
            "reference": reference[key],
            "candidate": candidate[key],
            "difference": difference,
            "ok": difference >= -tolerance - 1e-9,
        }  # fmt: skip (0.54 - 0.56 is -0.0200…02 in floats)
    return {"tolerance": tolerance, "passed": all(row["ok"] for row in rows.values()), "metrics": rows}


def format_gate(gate: dict, reference: str = "fp16", candidate: str = WEIGHT_FORMAT) -> str:
    """The gate as a Markdown table, one row per metric."""
    from helpers.course.teaching.quality import METRICS

    lines = [
        f"| metric | {reference} | {candidate} | difference | within {gate['tolerance']} |",
        "|---|---|---|---|---|",
    ]
    for key, row in gate["metrics"].items():
        lines.append(f"| {METRICS[key]} | {row['reference']:.3f} | {row['candidate']:.3f} | {row['difference']:+.3f} "
                     f"| {'yes' if row['ok'] else '**no**'} |")  # fmt: skip
    lines.append(
        f"\nGate {'PASSED' if gate['passed'] else 'FAILED'}: every metric within {gate['tolerance']} below {reference}."
    )
    return "\n".join(lines)


def measure_gate(model_dir: Path, *, scenes: int = 100, reference: str = "fp16", measure_reference: bool = False,
                 quality_json: Path | None = None, progress=None) -> dict:  # fmt: skip
    """Evaluate ``w8a8`` on the teaching model's held-out scenes exactly as ``helpers.course.teaching.quality`` evaluates
    fp16/int8 (same scenes, one thread, the model's generation settings), and compare with the ``reference``
    backend: measured here too with ``measure_reference``, else read from ``quality_json``."""
    from helpers.course.teaching.quality import measure

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
SIMILARITY_SAMPLES: tuple[str, ...] = (
    "grace_hopper",
    "pagoda",
    "flower",
    "text",
    "receipt",
    "shapes",
    "teaching_scene",
)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def feature_similarity(source: str, weight_formats: Sequence[str], *, ov_config: dict | None = None) -> dict:
    """Cosine similarity of each format's vision features (OpenVINO, ``ov_config``: the CPU's defaults unless given)
    to PyTorch FP32's, per image of :data:`SIMILARITY_SAMPLES`, with the per-token minimum (the worst image token)."""
    import torch
    from transformers import AutoProcessor

    from helpers.convert.conversion import load_torch_model
    from helpers.course.checkpoints import ensure_converted
    from helpers.runtime.ov_model import OVFlorence2Model
    from helpers.course.samples import load_sample

    processor = AutoProcessor.from_pretrained(source, trust_remote_code=False)
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
                np.linalg.norm(features, axis=-1) * np.linalg.norm(reference[name], axis=-1)
            )
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
    from helpers.course.teaching import TEACHING_MODEL_DIR

    parser = argparse.ArgumentParser(prog="python -m helpers.course.w8a8_gate",
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
        from helpers.course.checkpoints import resolve_model

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
    print(
        json.dumps({"passed": report["gate"]["passed"], "json": str(args.json) if args.json else None}),
        file=answer_stream,
    )
    return 0 if report["gate"]["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
