"""Measure the teaching model on held-out generated scenes: PyTorch, OpenVINO fp16 and OpenVINO int8 side by side.

    python -m helpers.teaching.quality --model helpers/data/teaching-model            # 100 scenes, 3 backends
    python -m helpers.teaching.quality --model helpers/data/teaching-model --scenes 3 --backends pytorch

The scenes come from :data:`helpers.teaching.scenes.HELD_OUT_SEED`, a seed training never uses, so every picture
is new to the model (the vocabulary of shapes, colours and words is the same). Metrics, each in 0..1:

* ``od_map50`` — ``<OD>`` mean average precision at IoU 0.5 over the categories (``red circle`` …), ranking boxes
  by their confidence (:mod:`helpers.scores`: geometric mean of the box's token probabilities);
* ``caption_exact`` — share of ``<CAPTION>`` answers equal to the ground-truth caption, character for character;
* ``ocr_char_accuracy`` — ``<OCR>`` character accuracy, ``1 - edit distance / length of the longer string``,
  averaged over scenes with a word; ``ocr_empty`` — share of word-less scenes answered with nothing;
* ``region_category`` — ``<REGION_TO_CATEGORY>`` answers naming the right category (leftmost object's box);
* ``grounding_recall50`` — ``<CAPTION_TO_PHRASE_GROUNDING>`` with the true caption: share of true boxes found with
  the right phrase at IoU ≥ 0.5;
* ``ocr_region`` — ``<OCR_WITH_REGION>``: share of words read exactly *and* boxed at IoU ≥ 0.5.

OpenVINO runs with the CPU plugin's defaults (on CPUs with bf16 support that means bf16 compute; the KV cache is
f16, :data:`helpers.ov_model.DECODER_DEFAULTS`),
because that is what a user gets; ``--exact`` switches to f32 for a like-for-like comparison of weights only.
Taught in ``notebooks/12_fine_tune.ipynb``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from helpers.teaching.scenes import HELD_OUT_SEED, Scene, caption, groups, make_scene, od_answer

BACKENDS: tuple[str, ...] = ("pytorch", "fp16", "int8")
BACKEND_TITLES: dict[str, str] = {"pytorch": "PyTorch", "fp16": "OpenVINO fp16", "int8": "OpenVINO int8"}
METRICS: dict[str, str] = {
    "od_map50": "<OD> mAP@0.5",
    "caption_exact": "<CAPTION> exact match",
    "ocr_char_accuracy": "<OCR> character accuracy",
    "ocr_empty": "<OCR> empty when no word",
    "region_category": "<REGION_TO_CATEGORY> accuracy",
    "grounding_recall50": "grounding recall@0.5",
    "ocr_region": "<OCR_WITH_REGION> word+box",
}
_LOC = re.compile(r"<loc_\d+>")

Box = Sequence[float]


# ----------------------------------------------------------------------------------------------------------------
# Metrics


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two ``(x1, y1, x2, y2)`` boxes (0 for disjoint or empty boxes)."""
    ax1, ay1, ax2, ay2 = (float(v) for v in a)
    bx1, by1, bx2, by2 = (float(v) for v in b)
    ax1, ax2 = min(ax1, ax2), max(ax1, ax2)  # a model may write x2 < x1: measure the box it meant
    ay1, ay2 = min(ay1, ay2), max(ay1, ay2)
    w = max(0.0, min(ax2, bx2) - max(ax1, bx1))
    h = max(0.0, min(ay2, by2) - max(ay1, by1))
    inter = w * h
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    return inter / union if union > 0 else 0.0


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions all cost 1)."""
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def char_accuracy(predicted: str, truth: str) -> float:
    """``1 - edit distance / length of the longer string``: 1.0 for a perfect read, 0.0 for nothing in common."""
    longest = max(len(predicted), len(truth))
    return 1.0 if longest == 0 else 1.0 - edit_distance(predicted, truth) / longest


def average_precision(
    predictions: Sequence[Sequence[tuple[str, Box, float]]],
    truths: Sequence[Sequence[tuple[str, Box]]],
    iou_threshold: float = 0.5,
) -> dict[str, float]:
    """Per-category average precision (all-point interpolation, as PASCAL VOC 2010+ and COCO at one IoU).

    ``predictions[i]`` are ``(label, box, score)`` for image ``i``, ``truths[i]`` its ``(label, box)``. Each true box
    matches at most one prediction (the highest-scoring one reaching ``iou_threshold``); further predictions on it
    are false positives. Equal scores are one threshold, so answers without scores are not ranked arbitrarily.
    Categories without a true box are left out (as COCO does). Returns ``{category: AP}``.
    """
    if len(predictions) != len(truths):
        raise ValueError(f"{len(predictions)} prediction lists for {len(truths)} images.")
    categories = sorted({label for image in truths for label, _ in image})
    result = {}
    for category in categories:
        true_boxes = {i: [box for label, box in image if label == category] for i, image in enumerate(truths)}
        positives = sum(len(boxes) for boxes in true_boxes.values())
        ranked = sorted(
            ((score, i, box) for i, image in enumerate(predictions) for label, box, score in image if label == category),
            key=lambda item: -item[0],
        )
        used = {i: [False] * len(boxes) for i, boxes in true_boxes.items()}
        points: list[tuple[float, float]] = []  # (recall, precision) at each distinct score threshold
        tp = fp = 0
        for k, (score, i, box) in enumerate(ranked):
            overlaps = [iou(box, t) for t in true_boxes[i]]
            best = max(range(len(overlaps)), key=overlaps.__getitem__, default=None)
            if best is not None and overlaps[best] >= iou_threshold and not used[i][best]:
                used[i][best] = True
                tp += 1
            else:
                fp += 1
            if k + 1 == len(ranked) or ranked[k + 1][0] != score:
                points.append((tp / positives, tp / (tp + fp)))
        ap, previous_recall = 0.0, 0.0
        for index, (recall, _) in enumerate(points):
            envelope = max(precision for _, precision in points[index:])
            ap += (recall - previous_recall) * envelope
            previous_recall = recall
        result[category] = ap
    return result


def mean_average_precision(predictions, truths, iou_threshold: float = 0.5) -> float:
    """The mean of :func:`average_precision` over categories (0.0 when there is nothing to find)."""
    per_category = average_precision(predictions, truths, iou_threshold)
    return sum(per_category.values()) / len(per_category) if per_category else 0.0


def strip_locations(text: str) -> str:
    """``"red circle<loc_1><loc_2><loc_3><loc_4>"`` → ``"red circle"``."""
    return _LOC.sub("", text).strip()


# ----------------------------------------------------------------------------------------------------------------
# Evaluation


def _batches(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def evaluate(
    model: Any,
    processor: Any,
    scenes: Sequence[Scene],
    *,
    batch_size: int = 8,
    progress: Callable[[str], None] | None = None,
    **generate_kwargs: Any,
) -> dict[str, Any]:
    """Run the six tasks on ``scenes`` with any model that has a transformers-style ``generate`` and score them.

    Returns the metrics of :data:`METRICS` plus ``seconds`` and a few example answers under ``examples``.
    """
    from helpers.scores import run_tasks_batch_with_scores
    from helpers.tasks import run_tasks_batch

    started = time.perf_counter()
    images = [scene.image for scene in scenes]

    def run(task: str, texts: Sequence[Any] | None = None, scored: bool = False) -> list[Any]:
        answers: list[Any] = []
        runner = run_tasks_batch_with_scores if scored else run_tasks_batch
        chunks = _batches(list(range(len(scenes))), batch_size)
        for chunk in chunks:
            chunk_texts = None if texts is None else [texts[i] for i in chunk]
            results = runner(model, processor, [images[i] for i in chunk], task, chunk_texts, **generate_kwargs)
            answers.extend(result[task] for result in results)
        if progress:
            progress(f"{task} done ({time.perf_counter() - started:.0f} s)")
        return answers

    metrics: dict[str, Any] = {}
    od = run("<OD>", scored=True)
    predictions = [
        [(label, box, score) for label, box, score in zip(a["labels"], a["bboxes"], a.get("scores", [1.0] * len(a["bboxes"])))]
        for a in od
    ]  # fmt: skip
    truths = [list(zip(od_answer(s)["labels"], od_answer(s)["bboxes"])) for s in scenes]
    metrics["od_map50"] = mean_average_precision(predictions, truths, 0.5)

    captions = run("<CAPTION>")
    metrics["caption_exact"] = sum(c.strip() == caption(s) for c, s in zip(captions, scenes)) / len(scenes)

    ocr = run("<OCR>")
    with_word = [(o, s.text.text) for o, s in zip(ocr, scenes) if s.text is not None]
    without = [o for o, s in zip(ocr, scenes) if s.text is None]
    metrics["ocr_char_accuracy"] = sum(char_accuracy(o.strip(), t) for o, t in with_word) / max(1, len(with_word))
    metrics["ocr_empty"] = sum(not o.strip() for o in without) / max(1, len(without))

    leftmost = [min(s.objects, key=lambda o: (o.box[0], o.box[1])) for s in scenes]
    regions = run("<REGION_TO_CATEGORY>", [obj.box for obj in leftmost])
    metrics["region_category"] = sum(strip_locations(r) == o.label for r, o in zip(regions, leftmost)) / len(scenes)

    grounded = run("<CAPTION_TO_PHRASE_GROUNDING>", [caption(s) for s in scenes])
    found = total = 0
    for answer, scene in zip(grounded, scenes):
        remaining = list(zip(answer["labels"], answer["bboxes"]))
        for group in groups(scene):
            for box in group.boxes:
                total += 1
                match = next((p for p in remaining if p[0] == group.phrase and iou(p[1], box) >= 0.5), None)
                if match is not None:
                    remaining.remove(match)
                    found += 1
    metrics["grounding_recall50"] = found / max(1, total)

    quads = run("<OCR_WITH_REGION>")
    good = 0
    for answer, scene in [(a, s) for a, s in zip(quads, scenes) if s.text is not None]:
        truth_box = scene.text.box
        for label, quad in zip(answer["labels"], answer["quad_boxes"]):
            box = (min(quad[0::2]), min(quad[1::2]), max(quad[0::2]), max(quad[1::2]))
            if label.strip() == scene.text.text and iou(box, truth_box) >= 0.5:
                good += 1
                break
    metrics["ocr_region"] = good / max(1, len(with_word))

    metrics["seconds"] = round(time.perf_counter() - started, 1)
    metrics["examples"] = [
        {"truth": caption(s), "caption": c, "od": {"labels": a["labels"], "bboxes": [[round(v, 1) for v in b] for b in a["bboxes"]]}}
        for s, c, a in list(zip(scenes, captions, od))[:3]
    ]  # fmt: skip
    return metrics


def held_out_scenes(count: int, seed: int = HELD_OUT_SEED) -> list[Scene]:
    """The first ``count`` held-out scenes (never seen in training)."""
    return [make_scene(seed, index) for index in range(count)]


def load_backend(model_dir: str | Path, backend: str, *, cache_dir: Path | None = None, exact: bool = False,
                 threads: int | None = None):  # fmt: skip
    """``(model, processor)`` for ``backend``: ``pytorch`` loads the folder; ``fp16`` / ``int8`` convert it once
    with :func:`helpers.conversion.convert_florence2` (into ``cache_dir``, default the collection's model cache,
    see :func:`helpers.models.converted_dir`) and load it with :class:`helpers.ov_model.OVFlorence2Model`."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}.")
    if backend == "pytorch":
        import torch

        if threads:
            torch.set_num_threads(threads)
        model = AutoModelForImageTextToText.from_pretrained(model_dir, trust_remote_code=False).eval()
        return model, AutoProcessor.from_pretrained(model_dir, trust_remote_code=False)
    from helpers.conversion import convert_florence2, is_converted
    from helpers.models import converted_dir
    from helpers.ov_model import EXACT_CONFIG, OVFlorence2Model

    folder = (Path(cache_dir) / f"{Path(model_dir).name}-{backend}") if cache_dir else converted_dir(str(model_dir), backend)
    if not is_converted(folder, weight_format=backend):
        import logging

        import nncf

        nncf.set_log_level(logging.ERROR)  # its per-layer tables would drown the report
        convert_florence2(str(model_dir), folder, backend, overwrite=folder.exists(), verbose=False)
    config: dict[str, Any] = dict(EXACT_CONFIG) if exact else {}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    model = OVFlorence2Model(folder, device="CPU", ov_config=config)
    return model, AutoProcessor.from_pretrained(folder, trust_remote_code=False)


def measure(
    model_dir: str | Path,
    *,
    scenes: int = 100,
    seed: int = HELD_OUT_SEED,
    backends: Sequence[str] = BACKENDS,
    cache_dir: Path | None = None,
    exact: bool = False,
    threads: int | None = 1,
    batch_size: int = 8,
    progress: Callable[[str], None] | None = None,
    **generate_kwargs: Any,
) -> dict[str, Any]:
    """Evaluate ``model_dir`` on ``scenes`` held-out scenes with every backend. Returns a JSON-ready report."""
    pictures = held_out_scenes(scenes, seed)
    report: dict[str, Any] = {
        "model": str(model_dir), "scenes": scenes, "seed": seed, "exact_openvino": exact,
        "generate_kwargs": generate_kwargs, "results": {},
    }  # fmt: skip
    for backend in backends:
        loaded = time.perf_counter()
        model, processor = load_backend(model_dir, backend, cache_dir=cache_dir, exact=exact, threads=threads)
        if progress:
            progress(f"{BACKEND_TITLES[backend]}: ready in {time.perf_counter() - loaded:.0f} s")
        report["results"][backend] = evaluate(
            model, processor, pictures, batch_size=batch_size,
            progress=(lambda line, b=backend: progress(f"  {BACKEND_TITLES[b]}: {line}")) if progress else None,
            **generate_kwargs,
        )  # fmt: skip
    return report


def format_table(report: dict[str, Any]) -> str:
    """The report as a Markdown table: one row per metric, one column per backend."""
    backends = list(report["results"])
    lines = [
        "| metric | " + " | ".join(BACKEND_TITLES[b] for b in backends) + " |",
        "|---|" + "---|" * len(backends),
    ]
    for key, title in METRICS.items():
        lines.append(f"| {title} | " + " | ".join(f"{report['results'][b][key]:.3f}" for b in backends) + " |")
    lines.append("| seconds (all six tasks) | " + " | ".join(f"{report['results'][b]['seconds']:.0f}" for b in backends) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m helpers.teaching.quality", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a trained Florence-2 folder")
    parser.add_argument("--scenes", type=int, default=100, help="held-out scenes to evaluate (default 100)")
    parser.add_argument("--seed", type=int, default=HELD_OUT_SEED)
    parser.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated: pytorch,fp16,int8")
    parser.add_argument("--cache-dir", type=Path, default=None, help="where converted models go (default: model cache)")
    parser.add_argument("--exact", action="store_true", help="OpenVINO in f32 (no bf16 compute, f32 KV cache)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for PyTorch and OpenVINO (default 1)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-beams", type=int, default=None, help="override the model's beam count")
    parser.add_argument("--no-repeat-ngram", type=int, default=None, help="override no_repeat_ngram_size")
    parser.add_argument("--json", type=Path, default=None, help="write the report here (default: print only)")
    args = parser.parse_args(argv)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown or not backends:
        parser.error(f"unknown backends {unknown}; choose from {', '.join(BACKENDS)}")
    if not (args.model / "config.json").exists():
        parser.error(f"{args.model} is not a model folder (no config.json); train one with python -m helpers.teaching.train")
    if args.scenes < 1:
        parser.error("--scenes must be at least 1")
    generate_kwargs: dict[str, Any] = {}
    if args.num_beams is not None:
        generate_kwargs["num_beams"] = args.num_beams
    if args.no_repeat_ngram is not None:
        generate_kwargs["no_repeat_ngram_size"] = args.no_repeat_ngram
    report = measure(
        args.model, scenes=args.scenes, seed=args.seed, backends=backends, cache_dir=args.cache_dir,
        exact=args.exact, threads=args.threads, batch_size=args.batch_size,
        progress=lambda line: print(line, file=sys.stderr, flush=True), **generate_kwargs,
    )  # fmt: skip
    print(format_table(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
