"""The offline experience of the task lessons: on the teaching model, the lessons' key paths draw boxes on the
shapes of the teaching scene and captions that name them (issue #8). Runs the same calls as the notebooks."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from helpers.course.samples import lesson_image, teaching_scene, teaching_scene_answer
from helpers.course.teaching import teaching_model_available
from helpers.course.teaching.quality import iou, strip_locations
from helpers.course.teaching.scenes import caption

pytestmark = pytest.mark.skipif(not teaching_model_available(), reason="the teaching model is not installed")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def teaching():
    """The teaching model as the lessons load it: fp16 OpenVINO on the CPU, with its processor and kind."""
    from helpers.course.checkpoints import TEACHING_MODEL, load_model
    from helpers.course.model_kind import model_kind

    model, processor = load_model(TEACHING_MODEL, "fp16", "CPU")
    return model, processor, model_kind(model)


def matched_boxes(answer: dict, truth: dict, labels_key: str = "labels") -> int:
    """How many ground-truth boxes the answer finds: same label, IoU >= 0.5."""
    return sum(
        any(label == truth_label and iou(tuple(box), tuple(truth_box)) >= 0.5
            for box, label in zip(answer["bboxes"], answer[labels_key]))
        for truth_box, truth_label in zip(truth["bboxes"], truth["labels"])
    )  # fmt: skip


def test_detection_lesson_draws_boxes_on_the_shapes(teaching, capsys: pytest.CaptureFixture) -> None:
    """05_detection: the shapes scene becomes the teaching scene, and <OD> boxes sit on its shapes."""
    from helpers.outputs.plotting import draw_answer
    from helpers.tasks.run import run_task

    model, processor, kind = teaching
    assert kind == "teaching"
    shapes = lesson_image("shapes", kind)
    assert "teaching scene" in capsys.readouterr().out
    truth = teaching_scene_answer()
    od = run_task(model, processor, shapes, "<OD>")["<OD>"]
    assert len(od["bboxes"]) == len(truth["bboxes"])
    assert matched_boxes(od, truth) >= len(truth["bboxes"]) - 1  # most boxes right (all of them today)
    drawn = draw_answer(shapes, "<OD>", od)
    assert drawn.size == shapes.size and drawn.tobytes() != shapes.tobytes()


def test_captioning_lesson_names_the_shapes(teaching) -> None:
    """04_captioning: the caption names every shape of the scene."""
    from helpers.tasks.run import run_task

    model, processor, kind = teaching
    caption = run_task(model, processor, lesson_image("grace_hopper", kind), "<CAPTION>")["<CAPTION>"]
    assert all(label in caption for label in teaching_scene_answer()["labels"]), caption


def test_grounding_lesson_boxes_its_phrases(teaching) -> None:
    """06_grounding: the lesson's sentence for the teaching model gets one right box per phrase."""
    from helpers.tasks.run import run_task

    model, processor, kind = teaching
    sentence = caption(teaching_scene())  # the notebook's SENTENCE for this model
    answer = run_task(model, processor, lesson_image("grace_hopper", kind), "<CAPTION_TO_PHRASE_GROUNDING>", sentence)
    grounded = answer["<CAPTION_TO_PHRASE_GROUNDING>"]
    truth = teaching_scene_answer()
    as_phrases = {"bboxes": truth["bboxes"], "labels": [f"a {label}" for label in truth["labels"]]}
    assert matched_boxes(grounded, as_phrases) >= len(truth["bboxes"]) - 1


def test_region_lesson_names_the_region_it_draws(teaching) -> None:
    """08_region_understanding: the blue square's ground-truth box is named, and the word's box fits the image."""
    from helpers.tasks.run import run_task

    model, processor, kind = teaching
    shapes = lesson_image("shapes", kind)
    truth = teaching_scene_answer()
    box = truth["bboxes"][truth["labels"].index("blue square")]
    category = run_task(model, processor, shapes, "<REGION_TO_CATEGORY>", box)["<REGION_TO_CATEGORY>"]
    assert strip_locations(category).strip() == "blue square"
    x1, y1, x2, y2 = teaching_scene().text.box
    assert 0 <= x1 < x2 <= shapes.width and 0 <= y1 < y2 <= shapes.height


def test_make_run_falls_back_to_the_teaching_model_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = importlib.util.spec_from_file_location("run_collection", REPO / "scripts" / "run_collection.py")
    run_collection = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_collection)
    monkeypatch.delenv("FLORENCE2_MODEL", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert run_collection.choose_model() == "teaching"
