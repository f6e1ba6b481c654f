"""Measure the teaching model on held-out generated scenes: PyTorch, OpenVINO fp16 and OpenVINO int8 side by side.

    python -m helpers.course.teaching.quality --model helpers/data/teaching-model            # 100 scenes, 3 backends
    python -m helpers.course.teaching.quality --model helpers/data/teaching-model --scenes 3 --backends pytorch

The scenes come from :data:`helpers.course.teaching.scenes.HELD_OUT_SEED`, a seed training never uses, drawn like the
training scenes (:func:`helpers.course.teaching.scenes.training_scene`: both renderers), so every picture is new to the
model (the vocabulary of shapes, colours and words is the same). Every task is scored, each metric in 0..1
(:data:`METRICS`; :data:`AIMS` says which metric decides whether a task meets its aim):

* box tasks (``<OD>``, ``<DENSE_REGION_CAPTION>``, ``<REGION_PROPOSAL>``, grounding, ``<OPEN_VOCABULARY_DETECTION>``
  and the three caption-then-grounding cascades) — recall and precision at IoU 0.5 with the right label
  (:func:`box_recall_precision`); ``<OD>`` also mean average precision at IoU 0.5 (``od_map50``, boxes ranked by
  their confidence, :mod:`helpers.outputs.scores`);
* captions — the share naming every shape with its colour and count and nothing else (:func:`names_every_shape`;
  the detailed ones must name the word too); ``<CAPTION>`` also exact match;
* segmentation — mean IoU of the answer's polygons, filled, with the true shapes' pixels (:func:`mask_iou`);
* region tasks — exact answers (category, description, the word);
* OCR — exact-word rate on scenes with a word (``<OCR>`` also: empty when there is none; character accuracy);
  ``<OCR_WITH_REGION>``: the word read exactly *and* boxed at IoU ≥ 0.5.

OpenVINO runs with the CPU plugin's defaults (on CPUs with bf16 support that means bf16 compute; the KV cache is
f16, :data:`helpers.runtime.ov_model.DECODER_DEFAULTS`),
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

from collections import Counter

import numpy as np
from PIL import Image, ImageDraw

from helpers.course.teaching.scenes import (
    COLOURS,
    COUNT_WORDS,
    HELD_OUT_SEED,
    SHAPE_KINDS,
    Scene,
    SceneObject,
    caption,
    caption_for,
    dense_label,
    fill_shape,
    groups,
    matching,
    od_answer,
    region_description,
    training_scene,
)

BACKENDS: tuple[str, ...] = ("pytorch", "fp16", "int8")
#: Every backend ``load_backend`` takes (``w8a8``: :mod:`helpers.convert.activation_quantization`, not in the default table).
BACKEND_TITLES: dict[str, str] = {
    "pytorch": "PyTorch",
    "fp16": "OpenVINO fp16",
    "int8": "OpenVINO int8",
    "w8a8": "OpenVINO w8a8",
}
METRICS: dict[str, str] = {
    "caption_names_shapes": "<CAPTION> names every shape",
    "caption_exact": "<CAPTION> exact match",
    "detailed_names_shapes": "<DETAILED_CAPTION> names every shape and the word",
    "more_detailed_names_shapes": "<MORE_DETAILED_CAPTION> names every shape and the word",
    "od_map50": "<OD> mAP@0.5",
    "od_recall50": "<OD> recall@0.5",
    "od_precision50": "<OD> precision@0.5",
    "dense_recall50": "<DENSE_REGION_CAPTION> recall@0.5",
    "dense_precision50": "<DENSE_REGION_CAPTION> precision@0.5",
    "proposal_recall50": "<REGION_PROPOSAL> recall@0.5",
    "proposal_precision50": "<REGION_PROPOSAL> precision@0.5",
    "grounding_recall50": "grounding recall@0.5",
    "grounding_precision50": "grounding precision@0.5",
    "cascade_caption_recall50": "<CAPTION> + grounding recall@0.5",
    "cascade_detailed_recall50": "<DETAILED_CAPTION> + grounding recall@0.5",
    "cascade_more_detailed_recall50": "<MORE_DETAILED_CAPTION> + grounding recall@0.5",
    "res_mask_iou": "<REFERRING_EXPRESSION_SEGMENTATION> mask IoU",
    "region_seg_mask_iou": "<REGION_TO_SEGMENTATION> mask IoU",
    "ovd_recall50": "<OPEN_VOCABULARY_DETECTION> recall@0.5",
    "ovd_precision50": "<OPEN_VOCABULARY_DETECTION> precision@0.5",
    "region_category": "<REGION_TO_CATEGORY> exact",
    "region_description": "<REGION_TO_DESCRIPTION> exact",
    "region_ocr": "<REGION_TO_OCR> exact word",
    "ocr_exact": "<OCR> exact word",
    "ocr_char_accuracy": "<OCR> character accuracy",
    "ocr_empty": "<OCR> empty when no word",
    "ocr_region": "<OCR_WITH_REGION> word+box",
}
#: Per task (or cascade): the metrics that decide it and the aim each must reach (issue #12: 0.8, and 0.7 for the
#: detailed captions, dense captions and segmentation).
AIMS: dict[str, tuple[tuple[str, ...], float]] = {
    "<CAPTION>": (("caption_names_shapes",), 0.8),
    "<DETAILED_CAPTION>": (("detailed_names_shapes",), 0.7),
    "<MORE_DETAILED_CAPTION>": (("more_detailed_names_shapes",), 0.7),
    "<OD>": (("od_recall50", "od_precision50"), 0.8),
    "<DENSE_REGION_CAPTION>": (("dense_recall50", "dense_precision50"), 0.7),
    "<REGION_PROPOSAL>": (("proposal_recall50", "proposal_precision50"), 0.8),
    "<CAPTION_TO_PHRASE_GROUNDING>": (("grounding_recall50", "grounding_precision50"), 0.8),
    "<REFERRING_EXPRESSION_SEGMENTATION>": (("res_mask_iou",), 0.7),
    "<REGION_TO_SEGMENTATION>": (("region_seg_mask_iou",), 0.7),
    "<OPEN_VOCABULARY_DETECTION>": (("ovd_recall50", "ovd_precision50"), 0.8),
    "<REGION_TO_CATEGORY>": (("region_category",), 0.8),
    "<REGION_TO_DESCRIPTION>": (("region_description",), 0.8),
    "<REGION_TO_OCR>": (("region_ocr",), 0.8),
    "<OCR>": (("ocr_exact", "ocr_empty"), 0.8),
    "<OCR_WITH_REGION>": (("ocr_region",), 0.8),
    "<CAPTION> + <CAPTION_TO_PHRASE_GROUNDING>": (("cascade_caption_recall50",), 0.8),
    "<DETAILED_CAPTION> + <CAPTION_TO_PHRASE_GROUNDING>": (("cascade_detailed_recall50",), 0.8),
    "<MORE_DETAILED_CAPTION> + <CAPTION_TO_PHRASE_GROUNDING>": (("cascade_more_detailed_recall50",), 0.8),
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
            (
                (score, i, box)
                for i, image in enumerate(predictions)
                for label, box, score in image
                if label == category
            ),
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


_COUNTS = {word: n for n, word in COUNT_WORDS.items()} | {"an": 1, "one": 1}
_MENTION = re.compile(
    rf"\b({'|'.join(_COUNTS)}) (?:(?:small|medium|large) )?({'|'.join(COLOURS)}) ({'|'.join(SHAPE_KINDS)})s?\b"
)


def mentioned_shapes(text: str) -> Counter:
    """How many shapes of each category a caption names: ``"two blue squares and a large red circle"`` →
    ``{"blue square": 2, "red circle": 1}``."""
    found: Counter = Counter()
    for count, colour, shape in _MENTION.findall(text.lower()):
        found[f"{colour} {shape}"] += _COUNTS[count]
    return found


def names_every_shape(text: str, scene: Scene, *, with_word: bool = False) -> bool:
    """Whether a caption names every shape of the scene with its colour and count, and no other shape; with
    ``with_word``, also the scene's word (``the word moon``), or no word when there is none."""
    if mentioned_shapes(text) != Counter(o.label for o in scene.objects):
        return False
    if not with_word:
        return True
    if scene.text is None:
        return "the word" not in text.lower()
    return re.search(rf"\b[Tt]he word {re.escape(scene.text.text)}\b", text) is not None


def box_recall_precision(
    predicted: Sequence[tuple[str, Box]],
    truth: Sequence[tuple[Any, Box]],
    same: Callable[[str, Any], bool] = lambda label, true_label: label == true_label,
    iou_threshold: float = 0.5,
) -> tuple[int, int, int]:
    """``(matched, predicted, true)`` box counts for one image: a true box is matched by at most one predicted box
    with ``same(label, true_label)`` and IoU ≥ ``iou_threshold`` (best overlap first). Sum them over images, then
    recall = matched / true, precision = matched / predicted (:func:`ratio`)."""
    remaining = list(predicted)
    matched = 0
    for true_label, true_box in truth:
        candidates = [(iou(box, true_box), k) for k, (label, box) in enumerate(remaining) if same(label, true_label)]
        best = max(candidates, default=(0.0, -1))
        if best[0] >= iou_threshold:
            remaining.pop(best[1])
            matched += 1
    return matched, len(predicted), len(truth)


def ratio(numerator: float, denominator: float) -> float:
    """``numerator / denominator``, and 1.0 for 0 / 0 (nothing to find and nothing found is right)."""
    return numerator / denominator if denominator else (1.0 if numerator == 0 else 0.0)


def _shape_mask(objects: Sequence[SceneObject], size: tuple[int, int]) -> np.ndarray:
    mask = Image.new("L", size, 0)
    draw = ImageDraw.Draw(mask)
    for obj in objects:
        fill_shape(draw, obj, 1)
    return np.asarray(mask) > 0


def polygon_mask(polygons: Sequence[Sequence[float]], size: tuple[int, int]) -> np.ndarray:
    """The pixels inside flat ``[x1, y1, x2, y2, …]`` polygons on an image of ``size`` = (width, height)."""
    mask = Image.new("L", size, 0)
    draw = ImageDraw.Draw(mask)
    for polygon in polygons:
        if len(polygon) >= 6:
            draw.polygon([(float(x), float(y)) for x, y in zip(polygon[0::2], polygon[1::2])], fill=1)
    return np.asarray(mask) > 0


def mask_iou(answer: dict[str, Any], objects: Sequence[SceneObject], size: tuple[int, int]) -> float:
    """IoU of a segmentation answer ``{'polygons': [[polygon, …], …]}`` (all instances together) with the pixels
    of ``objects``."""
    polygons = [polygon for instance in answer.get("polygons", []) for polygon in instance]
    predicted, truth = polygon_mask(polygons, size), _shape_mask(objects, size)
    union = np.logical_or(predicted, truth).sum()
    return float(np.logical_and(predicted, truth).sum() / union) if union else 1.0


# ----------------------------------------------------------------------------------------------------------------
# Evaluation

#: The keys of :func:`score`'s ``answers``: every task, and one grounding answer per caption level (the cascades).
CASCADES: dict[str, str] = {
    "<CAPTION> + <CAPTION_TO_PHRASE_GROUNDING>": "<CAPTION>",
    "<DETAILED_CAPTION> + <CAPTION_TO_PHRASE_GROUNDING>": "<DETAILED_CAPTION>",
    "<MORE_DETAILED_CAPTION> + <CAPTION_TO_PHRASE_GROUNDING>": "<MORE_DETAILED_CAPTION>",
}


def leftmost(scene: Scene) -> SceneObject:
    """The object the region, segmentation and open-vocabulary tasks are asked about in evaluation."""
    return min(scene.objects, key=lambda o: (o.box[0], o.box[1]))


def task_inputs(scene: Scene) -> dict[str, Any]:
    """The text input of every task that takes one, as evaluation asks it (``<REGION_TO_OCR>`` only with a word)."""
    obj = leftmost(scene)
    inputs: dict[str, Any] = {
        "<CAPTION_TO_PHRASE_GROUNDING>": caption(scene),
        "<REFERRING_EXPRESSION_SEGMENTATION>": obj.label,
        "<REGION_TO_SEGMENTATION>": obj.box,
        "<OPEN_VOCABULARY_DETECTION>": obj.label,
        "<REGION_TO_CATEGORY>": obj.box,
        "<REGION_TO_DESCRIPTION>": obj.box,
    }
    if scene.text is not None:
        inputs["<REGION_TO_OCR>"] = scene.text.box
    return inputs


def _boxes(answer: dict[str, Any], labels_key: str = "labels") -> list[tuple[str, Box]]:
    return list(zip(answer.get(labels_key, []), answer.get("bboxes", [])))


def _sum_counts(counts: Sequence[tuple[int, int, int]]) -> tuple[float, float]:
    matched, predicted, true = (sum(c[k] for c in counts) for k in range(3))
    return ratio(matched, true), ratio(matched, predicted)


def _names_object(phrase: str, obj: SceneObject) -> bool:
    words = phrase.lower().split()
    return obj.colour in words and any(w.removesuffix("s") == obj.shape for w in words)


def score(scenes: Sequence[Scene], answers: dict[str, Sequence[Any]], od_scores: Sequence[Sequence[float]] | None = None
          ) -> dict[str, float]:  # fmt: skip
    """Every metric of :data:`METRICS` from post-processed ``answers`` (``{task or cascade: [answer per scene]}``;
    ``<REGION_TO_OCR>`` has one answer per scene *with a word*, in order). ``od_scores`` ranks ``<OD>`` boxes for
    mAP (default: all equal)."""
    metrics: dict[str, float] = {}
    count = len(scenes)
    captions = answers["<CAPTION>"]
    metrics["caption_names_shapes"] = sum(names_every_shape(c, s) for c, s in zip(captions, scenes)) / count
    metrics["caption_exact"] = sum(c.strip() == caption(s) for c, s in zip(captions, scenes)) / count
    for key, task in (
        ("detailed_names_shapes", "<DETAILED_CAPTION>"),
        ("more_detailed_names_shapes", "<MORE_DETAILED_CAPTION>"),
    ):
        metrics[key] = sum(names_every_shape(c, s, with_word=True) for c, s in zip(answers[task], scenes)) / count

    od = answers["<OD>"]
    truths = [list(zip(od_answer(s)["labels"], od_answer(s)["bboxes"])) for s in scenes]
    scores = od_scores or [a.get("scores", [1.0] * len(a["bboxes"])) for a in od]
    ranked = [[(label, box, sc) for (label, box), sc in zip(_boxes(a), sco)] for a, sco in zip(od, scores)]
    metrics["od_map50"] = mean_average_precision(ranked, truths, 0.5)
    metrics["od_recall50"], metrics["od_precision50"] = _sum_counts(
        [box_recall_precision(_boxes(a), t) for a, t in zip(od, truths)])  # fmt: skip
    metrics["dense_recall50"], metrics["dense_precision50"] = _sum_counts([
        box_recall_precision(_boxes(a), [(dense_label(s, o), o.box) for o in s.objects])
        for a, s in zip(answers["<DENSE_REGION_CAPTION>"], scenes)
    ])  # fmt: skip
    metrics["proposal_recall50"], metrics["proposal_precision50"] = _sum_counts([
        box_recall_precision(_boxes(a), [("", o.box) for o in s.objects], same=lambda _a, _b: True)
        for a, s in zip(answers["<REGION_PROPOSAL>"], scenes)
    ])  # fmt: skip
    metrics["grounding_recall50"], metrics["grounding_precision50"] = _sum_counts([
        box_recall_precision(_boxes(a), [(g.phrase, box) for g in groups(s) for box in g.boxes])
        for a, s in zip(answers["<CAPTION_TO_PHRASE_GROUNDING>"], scenes)
    ])  # fmt: skip
    for cascade, key in zip(
        CASCADES, ("cascade_caption_recall50", "cascade_detailed_recall50", "cascade_more_detailed_recall50")
    ):
        metrics[key], _ = _sum_counts([
            box_recall_precision(_boxes(a), [(o, o.box) for o in s.objects], same=_names_object)
            for a, s in zip(answers[cascade], scenes)
        ])  # fmt: skip
    metrics["res_mask_iou"] = (
        sum(
            mask_iou(a, matching(s, leftmost(s).label), s.size)
            for a, s in zip(answers["<REFERRING_EXPRESSION_SEGMENTATION>"], scenes)
        )
        / count
    )
    metrics["region_seg_mask_iou"] = (
        sum(mask_iou(a, [leftmost(s)], s.size) for a, s in zip(answers["<REGION_TO_SEGMENTATION>"], scenes)) / count
    )
    metrics["ovd_recall50"], metrics["ovd_precision50"] = _sum_counts([
        box_recall_precision(_boxes(a, "bboxes_labels"), [(o.label, o.box) for o in matching(s, leftmost(s).label)])
        for a, s in zip(answers["<OPEN_VOCABULARY_DETECTION>"], scenes)
    ])  # fmt: skip
    metrics["region_category"] = (
        sum(strip_locations(r) == leftmost(s).label for r, s in zip(answers["<REGION_TO_CATEGORY>"], scenes)) / count
    )
    metrics["region_description"] = (
        sum(
            strip_locations(r) == region_description(s, leftmost(s))
            for r, s in zip(answers["<REGION_TO_DESCRIPTION>"], scenes)
        )
        / count
    )
    worded = [s for s in scenes if s.text is not None]
    metrics["region_ocr"] = ratio(
        sum(strip_locations(r) == s.text.text for r, s in zip(answers.get("<REGION_TO_OCR>", []), worded)), len(worded)
    )
    ocr = answers["<OCR>"]
    with_word = [(o.strip(), s.text.text) for o, s in zip(ocr, scenes) if s.text is not None]
    without = [o for o, s in zip(ocr, scenes) if s.text is None]
    metrics["ocr_exact"] = ratio(sum(o == t for o, t in with_word), len(with_word))
    metrics["ocr_char_accuracy"] = ratio(sum(char_accuracy(o, t) for o, t in with_word), len(with_word))
    metrics["ocr_empty"] = ratio(sum(not o.strip() for o in without), len(without))
    good = 0
    for answer, scene in [(a, s) for a, s in zip(answers["<OCR_WITH_REGION>"], scenes) if s.text is not None]:
        for label, quad in zip(answer["labels"], answer["quad_boxes"]):
            box = (min(quad[0::2]), min(quad[1::2]), max(quad[0::2]), max(quad[1::2]))
            if label.strip() == scene.text.text and iou(box, scene.text.box) >= 0.5:
                good += 1
                break
    metrics["ocr_region"] = ratio(good, len(with_word))
    return metrics


def shortfalls(metrics: dict[str, float]) -> dict[str, dict[str, float]]:
    """The tasks of :data:`AIMS` below their aim: ``{task: {metric: value, …, "aim": aim}}``."""
    result = {}
    for task, (keys, aim) in AIMS.items():
        if any(metrics[key] < aim for key in keys):
            result[task] = {**{key: round(metrics[key], 3) for key in keys}, "aim": aim}
    return result


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
    """Run all 15 tasks and the 3 cascades on ``scenes`` with any model that has a transformers-style
    ``generate``, and :func:`score` them. Returns the metrics of :data:`METRICS`, ``shortfalls``, ``seconds`` and
    a few example answers under ``examples``."""
    from helpers.outputs.scores import run_tasks_batch_with_scores
    from helpers.tasks.run import TASKS, run_tasks_batch

    started = time.perf_counter()

    def run(task: str, chosen: Sequence[Scene], texts: Sequence[Any] | None = None, scored: bool = False) -> list[Any]:
        answers: list[Any] = []
        runner = run_tasks_batch_with_scores if scored else run_tasks_batch
        for chunk in _batches(list(range(len(chosen))), batch_size):
            chunk_texts = None if texts is None else [texts[i] for i in chunk]
            results = runner(model, processor, [chosen[i].image for i in chunk], task, chunk_texts, **generate_kwargs)
            answers.extend(result[task] for result in results)
        if progress:
            progress(f"{task} done ({time.perf_counter() - started:.0f} s)")
        return answers

    inputs = [task_inputs(s) for s in scenes]
    answers: dict[str, list[Any]] = {}
    for task in TASKS:
        if task == "<REGION_TO_OCR>":
            worded = [(s, i[task]) for s, i in zip(scenes, inputs) if task in i]
            answers[task] = run(task, [s for s, _ in worded], [t for _, t in worded]) if worded else []
        elif task in inputs[0]:
            answers[task] = run(task, scenes, [i[task] for i in inputs], scored=False)
        else:
            answers[task] = run(task, scenes, scored=task == "<OD>")
    for cascade, caption_task in CASCADES.items():
        captions = answers[caption_task]
        answers[cascade] = run(
            "<CAPTION_TO_PHRASE_GROUNDING>", scenes, [c if c.strip() else "nothing" for c in captions]
        )
    metrics: dict[str, Any] = score(scenes, answers)
    metrics["shortfalls"] = shortfalls(metrics)
    metrics["seconds"] = round(time.perf_counter() - started, 1)
    metrics["examples"] = [
        {"truth": caption_for(s, "<DETAILED_CAPTION>"), "detailed caption": answers["<DETAILED_CAPTION>"][k],
         "od": {"labels": answers["<OD>"][k]["labels"],
                "bboxes": [[round(v, 1) for v in b] for b in answers["<OD>"][k]["bboxes"]]}}
        for k, s in enumerate(scenes[:3])
    ]  # fmt: skip
    return metrics


def held_out_scenes(count: int, seed: int = HELD_OUT_SEED) -> list[Scene]:
    """The first ``count`` held-out scenes (never seen in training), drawn like the training scenes."""
    return [training_scene(seed, index) for index in range(count)]


def load_backend(model_dir: str | Path, backend: str, *, cache_dir: Path | None = None, exact: bool = False,
                 threads: int | None = None):  # fmt: skip
    """``(model, processor)`` for ``backend``: ``pytorch`` loads the folder; ``fp16`` / ``int8`` convert it once
    with :func:`helpers.convert.conversion.convert_florence2` (into ``cache_dir``, default the collection's model cache,
    see :func:`helpers.course.checkpoints.converted_dir`) and load it with :class:`helpers.runtime.ov_model.OVFlorence2Model`."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if backend not in BACKEND_TITLES:
        raise ValueError(f"backend must be one of {', '.join(BACKEND_TITLES)}; got {backend!r}.")
    if backend == "pytorch":
        import torch

        if threads:
            torch.set_num_threads(threads)
        model = AutoModelForImageTextToText.from_pretrained(model_dir, trust_remote_code=False).eval()
        return model, AutoProcessor.from_pretrained(model_dir, trust_remote_code=False)
    from helpers.convert.conversion import convert_florence2
    from helpers.ir import is_converted
    from helpers.course.checkpoints import converted_dir
    from helpers.runtime.ov_model import EXACT_CONFIG, OVFlorence2Model

    folder = (
        (Path(cache_dir) / f"{Path(model_dir).name}-{backend}") if cache_dir else converted_dir(str(model_dir), backend)
    )
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
    """The report as a Markdown table: one row per metric, one column per backend, and the aim of the metrics that
    decide a task (:data:`AIMS`)."""
    backends = list(report["results"])
    aims = {key: aim for keys, aim in AIMS.values() for key in keys}
    lines = [
        "| metric | " + " | ".join(BACKEND_TITLES[b] for b in backends) + " | aim |",
        "|---|" + "---|" * (len(backends) + 1),
    ]
    for key, title in METRICS.items():
        aim = f"≥ {aims[key]}" if key in aims else ""
        lines.append(f"| {title} | " + " | ".join(f"{report['results'][b][key]:.3f}" for b in backends) + f" | {aim} |")
    lines.append(
        "| seconds (all tasks) | " + " | ".join(f"{report['results'][b]['seconds']:.0f}" for b in backends) + " | |"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m helpers.course.teaching.quality", description=__doc__.splitlines()[0]
    )
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
    unknown = [b for b in backends if b not in BACKEND_TITLES]
    if unknown or not backends:
        parser.error(f"unknown backends {unknown}; choose from {', '.join(BACKEND_TITLES)}")
    if not (args.model / "config.json").exists():
        parser.error(
            f"{args.model} is not a model folder (no config.json); train one with python -m helpers.course.teaching.train"
        )
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
