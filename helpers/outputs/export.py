"""Export Florence-2 answers to standard formats: COCO JSON and ``supervision.Detections``.

* :func:`to_coco` — many images and answers → one COCO detection/segmentation dataset (``images``, ``annotations``,
  ``categories``), readable by pycocotools, CVAT, FiftyOne, Label Studio and most training code. Category ids are
  assigned consistently: the same label always gets the same id, ids follow the sorted label names (or a mapping you
  pass, so that several exports share ids).
* :func:`to_supervision` — one answer → ``supervision.Detections`` (the optional ``supervision`` package), with
  confidences when the answer has scores (see :mod:`helpers.outputs.scores`), masks for polygons and oriented boxes for OCR.
* :func:`answer_instances` — the common step: any box/polygon/OCR answer as a flat list of instances.

Florence-2 coordinates are pixels ``(x1, y1, x2, y2)``; COCO wants ``[x, y, width, height]``. Model output is
untrusted (a small model may write x2 < x1), so corners are sorted; polygons with fewer than three points and
shapes without area (a box with x1 == x2, points on one line) cannot be drawn or matched — pycocotools' IoU with
them is always 0 — and are left out (counted in ``info["skipped_instances"]`` when nothing of an instance is left).
Text answers (captions, plain OCR) have no instances and are skipped.

Taught in ``notebooks/05_detection.ipynb`` (COCO and supervision export); used by :mod:`helpers.cli.batch`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ExportInstance", "answer_instances", "coco_categories", "to_coco", "to_supervision"]

#: Category name for instances without a label (``<REGION_PROPOSAL>`` boxes, empty referring-expression labels).
EMPTY_LABEL = "object"


@dataclass
class ExportInstance:
    """One box, polygon set or OCR quadrilateral of an answer, in pixels. Taught in ``notebooks/05_detection.ipynb``.

    ``box`` is ``(x_min, y_min, x_max, y_max)``; ``polygons`` lists flat ``[x1, y1, x2, y2, ...]`` outlines (empty
    for plain boxes; one quadrilateral for OCR); ``score`` is ``None`` when the answer has no scores.
    """

    label: str
    box: tuple[float, float, float, float]
    polygons: list[list[float]] = field(default_factory=list)
    score: float | None = None
    kind: str = "bboxes"

    @property
    def area(self) -> float:
        """Polygon area (shoelace formula, parts added) for outlines, width × height for boxes."""
        if self.polygons:
            return sum(_shoelace(polygon) for polygon in self.polygons)
        x1, y1, x2, y2 = self.box
        return (x2 - x1) * (y2 - y1)


def _shoelace(flat: Sequence[float]) -> float:
    xs, ys = flat[0::2], flat[1::2]
    n = len(xs)
    return abs(sum(xs[i] * ys[(i + 1) % n] - xs[(i + 1) % n] * ys[i] for i in range(n))) / 2.0


def _number(value: Any, what: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be numbers, got {value!r}.")
    if not math.isfinite(number):
        raise ValueError(f"{what} must be finite numbers, got {value!r}.")
    return number


def _box(raw: Any) -> tuple[float, float, float, float]:
    values = [_number(v, "Box coordinates") for v in raw]
    if len(values) != 4:
        raise ValueError(f"A box is four numbers (x1, y1, x2, y2), got {raw!r}.")
    x1, y1, x2, y2 = values
    return min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)


def _outline(raw: Any) -> list[float] | None:
    """A flat point list with at least three points (an unpaired last value dropped), or None."""
    values = [_number(v, "Polygon coordinates") for v in raw]
    values = values[: len(values) - len(values) % 2]
    return values if len(values) >= 6 else None


def _bounds(outlines: Sequence[Sequence[float]]) -> tuple[float, float, float, float]:
    xs = [x for outline in outlines for x in outline[0::2]]
    ys = [y for outline in outlines for y in outline[1::2]]
    return min(xs), min(ys), max(xs), max(ys)


def _unwrap(answer: Any, task: str | None) -> tuple[str | None, Any]:
    """``{task: answer}`` (what run_task returns) → (task, answer); a bare answer is returned as is."""
    if isinstance(answer, Mapping) and len(answer) == 1:
        ((key, value),) = answer.items()
        if isinstance(key, str) and key.startswith("<") and key.endswith(">"):
            return key, value
    return task, answer


def _column(answer: Mapping, key: str, length: int, what: str) -> list:
    values = list(answer.get(key) or [])
    if len(values) != length:
        raise ValueError(f"The answer has {length} {what} but {len(values)} {key!r}; they must pair up one to one.")
    return values


def answer_instances(answer: Any, *, task: str | None = None) -> tuple[list[ExportInstance], int]:
    """Flatten one answer (or ``{task: answer}``) into instances; returns ``(instances, skipped)`` where ``skipped``
    counts instances left out because they have no area (a zero-width or zero-height box; no polygon with three
    points enclosing any area). Text answers give ``([], 0)``.
    Taught in ``notebooks/05_detection.ipynb``."""
    task, answer = _unwrap(answer, task)
    if isinstance(answer, str) or answer is None:
        return [], 0
    if not isinstance(answer, Mapping):
        raise ValueError(
            f"Expected a Florence-2 answer (a dict such as {{'bboxes': [...], 'labels': [...]}}), got "
            f"{type(answer).__name__}."
        )
    instances: list[ExportInstance] = []
    skipped = 0

    def labels_and_scores(labels_key: str, scores_key: str, count: int, what: str) -> tuple[list, list]:
        labels = _column(answer, labels_key, count, what) if labels_key in answer or count else []
        scores = _column(answer, scores_key, count, what) if scores_key in answer else [None] * count
        return labels, scores

    def add_boxes(boxes_key: str, labels_key: str, scores_key: str) -> None:
        boxes = list(answer.get(boxes_key) or [])
        labels, scores = labels_and_scores(labels_key, scores_key, len(boxes), boxes_key)
        nonlocal skipped
        for raw, label, score in zip(boxes, labels, scores):
            instance = ExportInstance(str(label), _box(raw), [], _score(score), "bboxes")
            if instance.area > 0:
                instances.append(instance)
            else:
                skipped += 1

    def add_outlines(shapes_key: str, labels_key: str, scores_key: str, *, quads: bool) -> None:
        nonlocal skipped
        shapes = list(answer.get(shapes_key) or [])
        labels, scores = labels_and_scores(labels_key, scores_key, len(shapes), shapes_key)
        for raw, label, score in zip(shapes, labels, scores):
            parts = [raw] if quads else list(raw)
            outlines = [o for o in (_outline(part) for part in parts) if o is not None and _shoelace(o) > 0]
            if not outlines:
                skipped += 1
                continue
            kind = "quad_boxes" if quads else "polygons"
            instances.append(ExportInstance(str(label), _bounds(outlines), outlines, _score(score), kind))

    if "quad_boxes" in answer:
        add_outlines("quad_boxes", "labels", "scores", quads=True)
    elif "bboxes_labels" in answer or "polygons_labels" in answer:  # <OPEN_VOCABULARY_DETECTION>
        add_boxes("bboxes", "bboxes_labels", "bboxes_scores")
        add_outlines("polygons", "polygons_labels", "polygons_scores", quads=False)
    elif "polygons" in answer:
        add_outlines("polygons", "labels", "scores", quads=False)
    elif "bboxes" in answer:
        add_boxes("bboxes", "labels", "scores")
    else:
        where = f" for {task}" if task else ""
        raise ValueError(
            f"Unrecognised answer{where} with keys {sorted(answer)}; expected 'bboxes', 'polygons', 'quad_boxes' "
            "or the open-vocabulary keys, as post_process_generation returns them."
        )
    return instances, skipped


def _score(value: Any) -> float | None:
    if value is None:
        return None
    score = _number(value, "Scores")
    if not 0.0 <= score <= 1.0:
        raise ValueError(f"Scores must lie in [0, 1], got {score}.")
    return score


def _category_name(label: str, empty_label: str) -> str:
    return label.strip() or empty_label


def coco_categories(
    names: Iterable[str], categories: Mapping[str, int] | Sequence[str] | None = None
) -> dict[str, int]:
    """Category ids for ``names``: those of ``categories`` (a name → id mapping, or names numbered 1, 2, … in order)
    first, then every other name in sorted order after the largest id. Taught in ``notebooks/05_detection.ipynb``."""
    if categories is None:
        fixed: dict[str, int] = {}
    elif isinstance(categories, Mapping):
        fixed = {str(name): int(cid) for name, cid in categories.items()}
    else:
        fixed = {str(name): i for i, name in enumerate(categories, start=1)}
    if len(set(fixed.values())) != len(fixed):
        raise ValueError(f"Category ids must be unique, got {fixed}.")
    next_id = max(fixed.values(), default=0) + 1
    for name in sorted(set(names) - set(fixed)):
        fixed[name] = next_id
        next_id += 1
    return fixed


def _image_id(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _records(records: Iterable[Any]) -> Iterable[tuple[int | None, str, Any, Any, dict[str, Any]]]:
    """Yield ``(image_id or None, file_name, width, height, {task: answer})`` from tuples or dicts (JSONL lines of
    helpers.cli.batch)."""
    for number, record in enumerate(records, start=1):
        if isinstance(record, Mapping):
            if record.get("error") and not record.get("results"):
                continue  # an image that failed: nothing to export
            image = record.get("file_name", record.get("file", record.get("image_id")))
            if image is None:
                raise ValueError(f"Record {number} names no image: give 'file_name' (or 'file', 'image_id').")
            if "results" in record:
                results = dict(record["results"] or {})
            elif "task" in record and "answer" in record:
                results = {record["task"]: record["answer"]}
            else:
                raise ValueError(
                    f"Record {number} has no answers: give 'results' {{task: answer}} or 'task' and 'answer'."
                )
            image_id = _image_id(record.get("image_id", image))
            yield image_id, str(image), record.get("width"), record.get("height"), results
        elif isinstance(record, Sequence) and not isinstance(record, (str, bytes)) and len(record) == 5:
            image, width, height, task, answer = record
            yield _image_id(image), str(image), width, height, {task: answer}
        else:
            raise ValueError(
                f"Record {number} must be (file_name_or_id, width, height, task, answer) or a dict with 'file_name', "
                f"'width', 'height' and 'results'; got {record!r:.80}."
            )


def to_coco(
    records: Iterable[Any],
    *,
    categories: Mapping[str, int] | Sequence[str] | None = None,
    empty_label: str = EMPTY_LABEL,
) -> dict[str, Any]:
    """A COCO detection/segmentation dataset from Florence-2 answers. Taught in ``notebooks/05_detection.ipynb``.

    Each record is ``(file_name_or_id, width, height, task, answer)``, or a dict with ``file_name`` (or ``file``),
    ``width``, ``height`` and ``results`` (``{task: answer}``, as :mod:`helpers.cli.batch` writes them). Several records
    may describe the same image (one per task); it gets one image entry. Image ids are the given integer ids, or
    1, 2, … in order of first appearance.

    Every box, polygon set or OCR quadrilateral becomes an annotation with ``bbox`` ``[x, y, width, height]``,
    ``area``, ``iscrowd`` 0, ``category_id``, ``segmentation`` (polygons and quadrilaterals only), ``score`` (when
    the answer has scores, see :mod:`helpers.outputs.scores`) and ``task``. The category of an instance is its stripped
    label (``empty_label`` when empty); ids come from :func:`coco_categories`.
    """
    images: dict[Any, dict[str, Any]] = {}
    pending: list[tuple[int, str, ExportInstance]] = []
    skipped = 0
    for image_id, file_name, width, height, results in _records(records):
        key = file_name.replace("\\", "/")
        w, h = _number(width, "Image width"), _number(height, "Image height")
        if w <= 0 or h <= 0:
            raise ValueError(f"Image {key!r} has size {width}×{height}; width and height must be positive.")
        if key not in images:
            images[key] = {"file_name": key, "width": int(w), "height": int(h), "given_id": image_id}
        elif (images[key]["width"], images[key]["height"]) != (int(w), int(h)):
            raise ValueError(
                f"Image {key!r} appears with two sizes, {images[key]['width']}×{images[key]['height']} and "
                f"{int(w)}×{int(h)}; records of one image must agree."
            )
        for task, answer in results.items():
            instances, lost = answer_instances(answer, task=task)
            skipped += lost
            pending.extend((key, str(task), instance) for instance in instances)
    given = [e["given_id"] for e in images.values() if e["given_id"] is not None]
    if len(set(given)) != len(given):
        raise ValueError("Two different images were given the same image_id; ids must be unique.")
    next_id = max(given, default=0) + 1
    for entry in images.values():
        if entry["given_id"] is not None:
            entry["id"] = entry["given_id"]
        else:
            entry["id"] = next_id
            next_id += 1
    category_ids = coco_categories((_category_name(i.label, empty_label) for _, _, i in pending), categories)
    annotations = []
    for number, (key, task, instance) in enumerate(pending, start=1):
        x1, y1, x2, y2 = instance.box
        annotation: dict[str, Any] = {
            "id": number,
            "image_id": images[key]["id"],
            "category_id": category_ids[_category_name(instance.label, empty_label)],
            "bbox": [x1, y1, x2 - x1, y2 - y1],
            "area": instance.area,
            "iscrowd": 0,
        }
        if instance.polygons:
            annotation["segmentation"] = [list(outline) for outline in instance.polygons]
        if instance.score is not None:
            annotation["score"] = instance.score
        annotation["task"] = task
        annotations.append(annotation)
    return {
        "info": {"description": "Florence-2 answers exported by helpers.outputs.export.to_coco", "skipped_instances": skipped},
        "licenses": [],
        "images": [{"id": e["id"], "file_name": e["file_name"], "width": e["width"], "height": e["height"]}
                   for e in images.values()],
        "annotations": annotations,
        "categories": [{"id": cid, "name": name, "supercategory": "object"}
                       for name, cid in sorted(category_ids.items(), key=lambda item: item[1])],
    }  # fmt: skip


def _import_supervision() -> Any:
    try:
        import supervision
    except ImportError as error:
        raise ImportError(
            "to_supervision needs the optional package 'supervision', which is not installed. Install it with "
            "`pip install supervision` (it is not in requirements.txt), or use to_coco() instead."
        ) from error
    return supervision


def to_supervision(
    answer: Any,
    image_size: Sequence[float],
    *,
    task: str | None = None,
    categories: Mapping[str, int] | Sequence[str] | None = None,
    empty_label: str = EMPTY_LABEL,
) -> Any:
    """One answer (or ``{task: answer}``) as ``supervision.Detections``. Taught in ``notebooks/05_detection.ipynb``.

    ``xyxy`` holds the boxes (bounding boxes of polygons and quadrilaterals), ``confidence`` the scores when the
    answer has them, ``class_id`` the ids of :func:`coco_categories` (sorted labels from 0, or your ``categories``
    mapping), ``data["class_name"]`` the labels. Polygon answers also get ``mask`` (rasterised at ``image_size``,
    ``(width, height)``), OCR answers ``data["xyxyxyxy"]`` (supervision's oriented boxes). Needs the optional
    ``supervision`` package: raises ``ImportError`` naming the install command without it.
    """
    sv = _import_supervision()
    import numpy as np

    try:
        width, height = (int(round(_number(v, "image_size"))) for v in image_size)
    except (TypeError, ValueError):
        raise ValueError(f"image_size must be (width, height) in pixels, e.g. image.size; got {image_size!r}.")
    if width <= 0 or height <= 0:
        raise ValueError(f"image_size must be two positive numbers (width, height); got {image_size!r}.")
    instances, _ = answer_instances(answer, task=task)
    names = [_category_name(i.label, empty_label) for i in instances]
    if categories is None:
        ids = {name: i for i, name in enumerate(sorted(set(names)))}
    else:
        ids = coco_categories(names, categories)
    xyxy = np.array([i.box for i in instances], dtype=np.float32).reshape(-1, 4)
    scores = [i.score for i in instances]
    confidence = np.array(scores, dtype=np.float32) if instances and None not in scores else None
    mask = None
    if any(i.kind == "polygons" for i in instances):
        mask = np.stack([_rasterise(i, width, height) for i in instances]).astype(bool)
    data: dict[str, Any] = {"class_name": np.array(names, dtype=str)}
    if instances and all(i.kind == "quad_boxes" for i in instances):
        data["xyxyxyxy"] = np.array([i.polygons[0] for i in instances], dtype=np.float32).reshape(-1, 4, 2)
    return sv.Detections(
        xyxy=xyxy,
        mask=mask,
        confidence=confidence,
        class_id=np.array([ids[n] for n in names], dtype=int),
        data=data,
    )


def _rasterise(instance: ExportInstance, width: int, height: int) -> Any:
    import numpy as np
    from PIL import Image, ImageDraw

    canvas = Image.new("1", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    if instance.polygons:
        for outline in instance.polygons:
            draw.polygon(list(zip(outline[0::2], outline[1::2])), fill=1)
    else:
        draw.rectangle(instance.box, fill=1)
    return np.array(canvas, dtype=bool)
