"""helpers.outputs.export: COCO JSON and supervision.Detections from Florence-2 answers."""

from __future__ import annotations

import copy
import json
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers.outputs.export import answer_instances, coco_categories, to_coco, to_supervision

OD = {"bboxes": [[10.0, 20.0, 50.0, 80.0], [0.0, 0.0, 30.0, 30.0], [5.0, 5.0, 15.0, 25.0]],
      "labels": ["car", "tree", "car"], "scores": [0.9, 0.25, 0.5]}  # fmt: skip
SEGMENTATION = {"polygons": [[[10.0, 10.0, 60.0, 10.0, 60.0, 40.0, 10.0, 40.0]], [[1.0, 1.0, 2.0, 2.0]]],
                "labels": ["the red car", "ghost"], "scores": [0.7, 0.1]}  # fmt: skip
OCR = {"quad_boxes": [[0.0, 0.0, 40.0, 0.0, 40.0, 10.0, 0.0, 10.0]], "labels": ["TOTAL 12.50"], "scores": [0.8]}
OPEN_VOCABULARY = {"bboxes": [[20.0, 30.0, 40.0, 60.0]], "bboxes_labels": ["bicycle"], "polygons": [],
                   "polygons_labels": [], "bboxes_scores": [0.6], "polygons_scores": []}  # fmt: skip
PROPOSALS = {"bboxes": [[1.0, 2.0, 3.0, 4.0]], "labels": [""]}

RECORDS = [
    ("street.jpg", 100, 90, "<OD>", OD),
    ("street.jpg", 100, 90, "<CAPTION>", "A street with a car."),
    ("street.jpg", 100, 90, "<REFERRING_EXPRESSION_SEGMENTATION>", SEGMENTATION),
    ("receipt.png", 64, 48, "<OCR_WITH_REGION>", OCR),
    ("bike.jpg", 70, 70, "<OPEN_VOCABULARY_DETECTION>", OPEN_VOCABULARY),
    ("bike.jpg", 70, 70, "<REGION_PROPOSAL>", PROPOSALS),
]


def check_schema(dataset: dict) -> None:
    """The keys and types COCO readers rely on."""
    assert set(dataset) >= {"images", "annotations", "categories"}
    image_ids = {image["id"] for image in dataset["images"]}
    category_ids = {c["id"] for c in dataset["categories"]}
    assert len(image_ids) == len(dataset["images"]) and len(category_ids) == len(dataset["categories"])
    for image in dataset["images"]:
        assert isinstance(image["id"], int) and isinstance(image["file_name"], str)
        assert isinstance(image["width"], int) and isinstance(image["height"], int)
    for c in dataset["categories"]:
        assert isinstance(c["id"], int) and isinstance(c["name"], str) and c["name"]
    ann_ids = set()
    for ann in dataset["annotations"]:
        assert isinstance(ann["id"], int) and ann["id"] not in ann_ids
        ann_ids.add(ann["id"])
        assert ann["image_id"] in image_ids and ann["category_id"] in category_ids
        x, y, w, h = ann["bbox"]
        assert w >= 0 and h >= 0 and all(isinstance(v, float | int) for v in (x, y, w, h))
        assert ann["iscrowd"] == 0 and ann["area"] >= 0
        if "segmentation" in ann:
            assert all(len(p) >= 6 and len(p) % 2 == 0 for p in ann["segmentation"])
        if "score" in ann:
            assert 0.0 <= ann["score"] <= 1.0
    json.dumps(dataset)  # serialisable as is


def answers_back(dataset: dict, file_name: str, task: str) -> list[tuple[str, list[float], float | None]]:
    """(label, [x1, y1, x2, y2], score) of one image's annotations for one task, in order."""
    names = {c["id"]: c["name"] for c in dataset["categories"]}
    image_id = next(i["id"] for i in dataset["images"] if i["file_name"] == file_name)
    return [
        (names[a["category_id"]], [x, y, x + w, y + h], a.get("score"))
        for a in dataset["annotations"] if a["image_id"] == image_id and a["task"] == task
        for x, y, w, h in [a["bbox"]]
    ]  # fmt: skip


def test_coco_round_trip_of_every_answer_kind() -> None:
    dataset = to_coco(RECORDS)
    check_schema(dataset)
    assert [i["file_name"] for i in dataset["images"]] == ["street.jpg", "receipt.png", "bike.jpg"]
    assert [(i["width"], i["height"]) for i in dataset["images"]] == [(100, 90), (64, 48), (70, 70)]
    assert answers_back(dataset, "street.jpg", "<OD>") == [
        (label, box, score) for label, box, score in zip(OD["labels"], OD["bboxes"], OD["scores"])
    ]
    segmentation = answers_back(dataset, "street.jpg", "<REFERRING_EXPRESSION_SEGMENTATION>")
    assert segmentation == [("the red car", [10.0, 10.0, 60.0, 40.0], 0.7)]  # the two-point polygon cannot be kept
    assert dataset["info"]["skipped_instances"] == 1
    seg_ann = next(a for a in dataset["annotations"] if a["task"] == "<REFERRING_EXPRESSION_SEGMENTATION>")
    assert seg_ann["segmentation"] == SEGMENTATION["polygons"][0] and seg_ann["area"] == pytest.approx(50 * 30)
    assert answers_back(dataset, "receipt.png", "<OCR_WITH_REGION>") == [("TOTAL 12.50", [0.0, 0.0, 40.0, 10.0], 0.8)]
    bike = answers_back(dataset, "bike.jpg", "<OPEN_VOCABULARY_DETECTION>")
    assert bike == [("bicycle", [20.0, 30.0, 40.0, 60.0], 0.6)]
    assert answers_back(dataset, "bike.jpg", "<REGION_PROPOSAL>") == [("object", [1.0, 2.0, 3.0, 4.0], None)]
    assert not any(a["task"] == "<CAPTION>" for a in dataset["annotations"])
    names = [c["name"] for c in dataset["categories"]]
    assert names == sorted(names) and [c["id"] for c in dataset["categories"]] == list(range(1, len(names) + 1))


def test_category_ids_are_consistent_and_independent_of_record_order() -> None:
    forward, backward = to_coco(RECORDS), to_coco(RECORDS[::-1])
    assert forward["categories"] == backward["categories"]
    car = next(c["id"] for c in forward["categories"] if c["name"] == "car")
    assert {a["category_id"] for a in forward["annotations"] if a.get("task") == "<OD>" and a["score"] != 0.25} == {car}
    fixed = to_coco(RECORDS, categories={"tree": 7, "car": 3})
    ids = {c["name"]: c["id"] for c in fixed["categories"]}
    assert ids["tree"] == 7 and ids["car"] == 3 and min(v for k, v in ids.items() if k not in ("tree", "car")) == 8
    assert coco_categories(["b", "a"], ["z"]) == {"z": 1, "a": 2, "b": 3}


def test_batch_jsonl_records_given_ids_and_untrusted_boxes() -> None:
    lines = [
        {"file": "a.jpg", "width": 10, "height": 10, "results": {"<OD>": {"bboxes": [[8, 9, 2, 1]], "labels": ["x"]}}},
        {"file": "broken.jpg", "results": {}, "error": "ValueError: not an image"},
        {"file_name": "c.jpg", "image_id": 42, "width": 5, "height": 5, "task": "<OD>",
         "answer": {"bboxes": [], "labels": []}},
    ]  # fmt: skip
    dataset = to_coco(lines)
    check_schema(dataset)
    assert [(i["id"], i["file_name"]) for i in dataset["images"]] == [(43, "a.jpg"), (42, "c.jpg")]
    (annotation,) = dataset["annotations"]
    assert annotation["bbox"] == [2, 1, 6, 8] and annotation["area"] == 48  # corners sorted, not negative sizes


@pytest.mark.parametrize(
    "records, message",
    [
        ([("a.jpg", 10, 10, "<OD>", {"bboxes": [[0, 0, 1, 1]], "labels": []})], "pair up"),
        ([("a.jpg", 10, 10, "<OD>", {"bboxes": [[0, 0, 1, 1]], "labels": ["x"], "scores": [1.5]})], r"\[0, 1\]"),
        ([("a.jpg", 10, 10, "<OD>", {"bboxes": [[0, 0, 1]], "labels": ["x"]})], "four numbers"),
        ([("a.jpg", 10, 10, "<OD>", {"boxes": []})], "Unrecognised answer"),
        ([("a.jpg", 10, 10, "<OD>", PROPOSALS), ("a.jpg", 20, 10, "<OD>", PROPOSALS)], "two sizes"),
        ([("a.jpg", 0, 10, "<OD>", PROPOSALS)], "positive"),
        ([("a.jpg", 10, 10)], "Record 1 must be"),
        ([{"width": 1, "height": 1, "results": {}}], "names no image"),
    ],
)
def test_bad_records_name_the_problem(records, message) -> None:
    with pytest.raises(ValueError, match=message):
        to_coco(records)


box = st.tuples(*[st.floats(0, 500, allow_nan=False) for _ in range(4)]).map(list)


@settings(max_examples=50, deadline=None)
@given(
    answers=st.lists(
        st.lists(st.tuples(box, st.sampled_from(["car", "dog", " tree ", ""]), st.floats(0, 1)), max_size=5),
        min_size=1, max_size=4,
    )
)  # fmt: skip
def test_any_box_answers_round_trip(answers) -> None:
    records = [
        (f"img{i}.png", 501, 501, "<OD>",
         {"bboxes": [b for b, _, _ in a], "labels": [lab for _, lab, _ in a], "scores": [s for _, _, s in a]})
        for i, a in enumerate(answers)
    ]  # fmt: skip
    dataset = json.loads(json.dumps(to_coco(records)))
    check_schema(dataset)
    flat = sum(1 for a in answers for (x1, y1, x2, y2), _, _ in a if x1 == x2 or y1 == y2)
    assert dataset["info"]["skipped_instances"] == flat  # boxes without area are left out, and counted
    for i, answer in enumerate(answers):
        back = answers_back(dataset, f"img{i}.png", "<OD>")
        answer = [(b, lab, s) for b, lab, s in answer if b[0] != b[2] and b[1] != b[3]]
        assert len(back) == len(answer)
        for (label, xyxy, score), (raw_box, raw_label, raw_score) in zip(back, answer):
            assert label == (raw_label.strip() or "object") and score == raw_score
            x1, y1, x2, y2 = raw_box
            expected = [min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)]
            np.testing.assert_allclose(xyxy, expected, atol=1e-9)


def test_pycocotools_reads_and_evaluates_the_export() -> None:
    coco_module = pytest.importorskip("pycocotools.coco")
    cocoeval = pytest.importorskip("pycocotools.cocoeval")
    dataset = to_coco(RECORDS)
    ground_truth = coco_module.COCO()
    ground_truth.dataset = copy.deepcopy(dataset)
    ground_truth.createIndex()
    assert len(ground_truth.getAnnIds()) == len(dataset["annotations"])
    polygon = next(a for a in ground_truth.loadAnns(ground_truth.getAnnIds()) if "segmentation" in a)
    mask = ground_truth.annToMask(polygon)
    assert mask.shape == (90, 100) and 0.8 * polygon["area"] <= mask.sum() <= 1.2 * polygon["area"]
    # The export used as detections against itself: a perfect match, which proves boxes/ids/scores are read right.
    results = [{k: v for k, v in a.items() if k != "segmentation"} | {"score": a.get("score", 1.0)}
               for a in dataset["annotations"]]  # fmt: skip
    detections = ground_truth.loadRes(results)
    evaluation = cocoeval.COCOeval(ground_truth, detections, "bbox")
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    assert evaluation.stats[0] == pytest.approx(1.0)


# ---- supervision -------------------------------------------------------------------------------------------------


def test_to_supervision_without_the_package_says_how_to_install(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "supervision", None)  # import supervision now raises ImportError
    with pytest.raises(ImportError, match="pip install supervision"):
        to_supervision({"<OD>": OD}, (100, 90))


def test_to_supervision_detections() -> None:
    sv = pytest.importorskip("supervision")
    detections = to_supervision({"<OD>": OD}, (100, 90))
    assert isinstance(detections, sv.Detections) and len(detections) == 3
    np.testing.assert_allclose(detections.xyxy, OD["bboxes"])
    np.testing.assert_allclose(detections.confidence, OD["scores"], rtol=1e-6)
    assert list(detections.data["class_name"]) == OD["labels"] and list(detections.class_id) == [0, 1, 0]
    assert detections.mask is None
    fixed = to_supervision(OD, (100, 90), task="<OD>", categories={"tree": 5})
    assert list(fixed.class_id) == [6, 5, 6]

    masks = to_supervision(SEGMENTATION, (100, 90))
    assert len(masks) == 1 and masks.mask.shape == (1, 90, 100)  # the two-point polygon is left out
    assert 0.8 * 50 * 30 <= masks.mask[0].sum() <= 1.2 * 50 * 30 and masks.mask[0, 25, 30] and not masks.mask[0, 5, 5]

    ocr = to_supervision(OCR, (64, 48))
    assert ocr.data["xyxyxyxy"].shape == (1, 4, 2) and ocr.confidence is not None

    unscored = to_supervision(PROPOSALS, (10, 10))
    assert unscored.confidence is None and list(unscored.data["class_name"]) == ["object"]
    assert len(to_supervision({"bboxes": [], "labels": []}, (10, 10))) == 0


def test_answer_instances_of_text_answers_are_empty() -> None:
    assert answer_instances({"<CAPTION>": "a cat"}) == ([], 0)
    instances, skipped = answer_instances(OPEN_VOCABULARY)
    assert [(i.kind, i.label, i.score) for i in instances] == [("bboxes", "bicycle", 0.6)] and skipped == 0


def test_zero_area_shapes_are_skipped_and_counted() -> None:
    """pycocotools can never match a box or polygon without area (IoU 0), so exporting one only hides an error."""
    pytest.importorskip("supervision")
    od = {"bboxes": [[10.0, 20.0, 10.0, 80.0], [5.0, 5.0, 15.0, 25.0], [3.0, 7.0, 9.0, 7.0]], "labels": ["a", "b", "c"]}
    flat = {
        "polygons": [[[0.0, 0.0, 5.0, 5.0, 10.0, 10.0]], [[0.0, 0.0, 8.0, 0.0, 8.0, 8.0]]],
        "labels": ["line", "ok"],
    }
    ocr = {"quad_boxes": [[1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]], "labels": ["dot"]}
    dataset = to_coco([("x.jpg", 40, 40, "<OD>", od), ("x.jpg", 40, 40, "<REFERRING_EXPRESSION_SEGMENTATION>", flat),
                       ("x.jpg", 40, 40, "<OCR_WITH_REGION>", ocr)])  # fmt: skip
    check_schema(dataset)
    assert [a["bbox"] for a in dataset["annotations"]] == [[5.0, 5.0, 10.0, 20.0], [0.0, 0.0, 8.0, 8.0]]
    assert all(a["area"] > 0 for a in dataset["annotations"])
    assert dataset["info"]["skipped_instances"] == 4
    assert answer_instances({"<OD>": od})[1] == 2
    detections = to_supervision({"<OD>": od}, (40, 40))
    assert list(detections.data["class_name"]) == ["b"]
