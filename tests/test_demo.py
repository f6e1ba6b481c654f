"""helpers.ui.demo: the Run button's callback, called directly, and the widget driven like a user (``.click()``).

Everything runs on the tiny random-weight model converted to OpenVINO: its answers are noise, so the tests check
structure (which keys, which sizes, what got drawn, what the widgets show), never particular words or boxes.
"""

from __future__ import annotations

import html
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers.ui.demo import (
    BUSY_LABEL,
    CSS_CLASSES,
    RUN_LABEL,
    DemoResult,
    answer_to_json,
    build_demo,
    parse_pixel_box,
    run_demo_request,
    task_hint,
)
from helpers.outputs.plotting import draw_answer
from helpers.course.samples import load_sample, sample_path
from helpers.tasks.run import CASCADED_TASKS, TASKS, box_to_loc

#: Short answers keep the tests quick; the demo passes these through to generate like any user setting.
FAST = {"max_new_tokens": 24, "num_beams": 1}


@pytest.fixture(scope="module")
def ov_tiny(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The tiny model converted (fp32) into a private cache and loaded on the CPU with helpers.course.checkpoints.load_model."""
    from helpers.course.checkpoints import load_model

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FLORENCE2_MODELS_DIR", str(tmp_path_factory.mktemp("demo-converted")))
        return load_model(str(tiny_model_dir), "fp32", "CPU")


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return load_sample("grace_hopper")


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _differs(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and bool(np.any(np.asarray(a) != np.asarray(b)))


# ---- the callback ----------------------------------------------------------------------------------------------


def test_detection_request_returns_drawing_answer_and_time(ov_tiny, photo):
    model, processor = ov_tiny
    result = run_demo_request(model, processor, photo, "<OD>", None, **FAST)
    assert isinstance(result, DemoResult)
    assert result.ok and result.error is None, result.error
    assert result.task == "<OD>" and list(result.answer) == ["<OD>"]
    answer = result.answer["<OD>"]
    assert set(answer) >= {"bboxes", "labels"} and len(answer["bboxes"]) == len(answer["labels"])
    assert result.seconds > 0
    assert isinstance(result.image_drawn, Image.Image) and result.image_drawn.size == photo.size
    expected = draw_answer(photo, "<OD>", answer)
    assert np.array_equal(np.asarray(result.image_drawn), np.asarray(expected)), "the drawing is of this answer"
    assert np.array_equal(np.asarray(photo), np.asarray(load_sample("grace_hopper"))), "input left untouched"


def test_every_task_and_cascade_answers_without_error(ov_tiny, photo):
    model, processor = ov_tiny
    texts = {"text": "a woman in uniform", "region": "40, 60, 300, 400"}
    for task, spec in TASKS.items():
        result = run_demo_request(model, processor, photo, task, texts.get(spec.text_kind), **FAST)
        assert result.ok, f"{task}: {result.error}"
        assert list(result.answer) == [task] and result.image_drawn.size == photo.size
    for name, spec in CASCADED_TASKS.items():
        result = run_demo_request(model, processor, photo, name, **FAST)
        assert result.ok, f"{name}: {result.error}"
        assert list(result.answer) == [spec.caption_task, spec.grounding_task]
        assert isinstance(result.answer[spec.caption_task], str)


def test_region_in_pixels_is_converted_with_box_to_loc_and_drawn(ov_tiny, photo):
    model, processor = ov_tiny
    box = (40, 60, 300, 400)
    by_argument = run_demo_request(model, processor, photo, "<REGION_TO_CATEGORY>", None, region_px=box, **FAST)
    by_text = run_demo_request(model, processor, photo, "<REGION_TO_CATEGORY>", "40, 60, 300, 400", **FAST)
    by_tokens = run_demo_request(model, processor, photo, "<REGION_TO_CATEGORY>", box_to_loc(box, photo.size), **FAST)
    assert by_argument.ok and by_text.ok and by_tokens.ok
    assert by_argument.text_input == by_text.text_input == by_tokens.text_input == box_to_loc(box, photo.size)
    assert by_argument.answer == by_text.answer == by_tokens.answer
    assert _differs(by_argument.image_drawn, photo), "the asked region is outlined on the picture"


@pytest.mark.parametrize(
    ("task", "text", "region", "message"),
    [
        ("<CAPTION_TO_PHRASE_GROUNDING>", None, None, "needs a text input"),
        ("<CAPTION_TO_PHRASE_GROUNDING>", "   ", None, "needs a text input"),
        ("<OD>", "a dog", None, "takes no text input"),
        ("<OD>", None, (1, 2, 3, 4), "takes no region"),
        ("<REGION_TO_CATEGORY>", "10, 20, 30", None, "exactly 4"),
        ("<REGION_TO_CATEGORY>", "10, 20, thirty, 40", None, "not a number"),
        ("<REGION_TO_CATEGORY>", None, (0, 0, 99999, 10), "outside"),
        ("<REGION_TO_CATEGORY>", None, (300, 0, 100, 10), "not (left, top, right, bottom)"),
        ("<REGION_TO_CATEGORY>", "<loc_1><loc_2>", None, "exactly 4"),
        ("<CAPTION> + <CAPTION_TO_PHRASE_GROUNDING>", "a dog", None, "writes its own caption"),
        ("<OBJECT_FINDING>", None, None, "Unknown task"),
    ],
)
def test_bad_requests_come_back_as_messages_not_exceptions(ov_tiny, photo, task, text, region, message):
    model, processor = ov_tiny
    result = run_demo_request(model, processor, photo, task, text, region_px=region, **FAST)
    assert not result.ok and message in result.error
    assert result.answer == {} and result.seconds == 0.0


def test_image_sources_path_bytes_and_their_errors(ov_tiny, tmp_path):
    model, processor = ov_tiny
    from_path = run_demo_request(model, processor, str(sample_path("shapes")), "<OD>", **FAST)
    from_bytes = run_demo_request(model, processor, sample_path("shapes").read_bytes(), "<OD>", **FAST)
    assert from_path.ok and from_bytes.ok
    assert from_path.answer == from_bytes.answer and from_path.image_drawn.size == load_sample("shapes").size

    missing = run_demo_request(model, processor, str(tmp_path / "nope.jpg"), "<OD>")
    assert not missing.ok and "not found" in missing.error and missing.image_drawn is None
    garbage = run_demo_request(model, processor, b"definitely not a picture", "<OD>")
    assert not garbage.ok and "not an image" in garbage.error
    for empty in (None, "", b""):
        result = run_demo_request(model, processor, empty, "<OD>")
        assert not result.ok and ("image" in result.error.lower() or "empty" in result.error)


def test_model_failure_is_reported_with_its_type(ov_tiny, photo):
    model, processor = ov_tiny
    result = run_demo_request(model, processor, photo, "<OD>", max_new_tokens=0)
    assert not result.ok and "max_new_tokens" in result.error


def test_parse_pixel_box_and_hints():
    assert parse_pixel_box("10, 20, 30.5, 40") == (10, 20, 30.5, 40)
    assert parse_pixel_box("(10 20 30 40)") == parse_pixel_box("[10;20;30;40]") == (10, 20, 30, 40)
    assert parse_pixel_box([1, 2, 3, 4]) == (1, 2, 3, 4)
    for bad in ("1, 2, 3", "1 2 3 4 5", "a b c d", "<loc_1><loc_2><loc_3><loc_4>", "1, 2, 3, nan"):
        with pytest.raises(ValueError):
            parse_pixel_box(bad)
    for task, spec in TASKS.items():
        hint = task_hint(task)
        assert hint, task
        if spec.text_kind == "region":
            assert "x1, y1, x2, y2" in hint
        else:
            assert hint == spec.hint
    assert all(task_hint(name) for name in CASCADED_TASKS)


def test_answer_json_round_trips(ov_tiny, photo):
    model, processor = ov_tiny
    result = run_demo_request(model, processor, photo, "<OCR_WITH_REGION>", **FAST)
    text = answer_to_json(result.answer)
    assert json.loads(text).keys() == result.answer.keys()
    quads = json.loads(text)["<OCR_WITH_REGION>"]["quad_boxes"]
    assert quads == [[round(float(v), 2) for v in quad] for quad in result.answer["<OCR_WITH_REGION>"]["quad_boxes"]]
    assert json.loads(answer_to_json({"<CAPTION>": 'quote " and <tag>'})) == {"<CAPTION>": 'quote " and <tag>'}


# ---- the widget ------------------------------------------------------------------------------------------------


def test_widget_lists_every_task_and_enables_text_only_where_needed(ov_tiny):
    demo = build_demo(*ov_tiny)
    values = [value for _, value in demo.task.options]
    assert set(values) == set(TASKS) | set(CASCADED_TASKS) and len(values) == 18
    assert demo.task.value == "<OD>" and demo.text.disabled
    for task in values:
        demo.task.value = task
        needs_text = task in TASKS and TASKS[task].needs_text
        assert demo.text.disabled is (not needs_text), task
        assert task_hint(task) in demo.text.placeholder or not needs_text
        assert html.escape(task_hint(task)) in demo.hint.value
    for name in ("demo", "task", "run", "output_image", "answer", "text", "error"):
        widget = demo if name == "demo" else getattr(demo, {"run": "run_button"}.get(name, name))
        assert CSS_CLASSES[name] in widget._dom_classes


def test_clicking_run_fills_the_outputs(ov_tiny, photo):
    demo = build_demo(*ov_tiny, default_sample="grace_hopper", generate_kwargs=FAST)
    assert demo.output_image.value == b"" and demo.answer.value == ""
    demo.run_button.click()
    result = demo.last_result
    assert result is not None and result.ok, result and result.error
    shown = Image.open(io.BytesIO(demo.output_image.value))
    assert shown.size == photo.size  # under DISPLAY_MAX_SIDE: shown at full size
    assert np.array_equal(np.asarray(shown.convert("RGB")), np.asarray(result.image_drawn))
    assert "&lt;OD&gt;" in demo.answer.value and "bboxes" in demo.answer.value
    assert "Answered in" in demo.time.value and f"{result.seconds:.2f} s" in demo.time.value
    assert demo.error.layout.display == "none"
    assert not demo.run_button.disabled and demo.run_button.description == RUN_LABEL


def test_run_button_is_busy_while_the_model_runs(ov_tiny):
    model, processor = ov_tiny

    class Recording:
        """The real model, noting the Run button's state whenever generate is called."""

        def __init__(self):
            self.seen: list[tuple[bool, str]] = []

        def __getattr__(self, name):
            return getattr(model, name)

        def generate(self, **kwargs):
            self.seen.append((demo.run_button.disabled, demo.run_button.description))
            return model.generate(**kwargs)

    recording = Recording()
    demo = build_demo(recording, processor, generate_kwargs=FAST)
    demo.run_button.click()
    assert demo.last_result.ok, demo.last_result.error
    assert recording.seen and all(state == (True, BUSY_LABEL) for state in recording.seen)
    assert (demo.run_button.disabled, demo.run_button.description) == (False, RUN_LABEL)


def test_region_task_through_the_widget(ov_tiny, photo):
    demo = build_demo(*ov_tiny, generate_kwargs=FAST)
    demo.task.value = "<REGION_TO_DESCRIPTION>"
    assert not demo.text.disabled and demo.text.description == "Region:"
    demo.text.value = "40, 60, 300, 400"
    demo.run_button.click()
    assert demo.last_result.ok and demo.last_result.text_input == box_to_loc((40, 60, 300, 400), photo.size)
    assert "&lt;REGION_TO_DESCRIPTION&gt;" in demo.answer.value


def test_errors_show_inside_the_widget(ov_tiny, tmp_path):
    demo = build_demo(*ov_tiny, generate_kwargs=FAST)
    demo.source.value = "path"
    demo.path.value = str(tmp_path / "missing.png")
    assert "not found" in demo.image_info.value
    demo.run_button.click()  # must not raise
    assert demo.error.layout.display != "none" and "not found" in demo.error.value and "⚠️" in demo.error.value
    assert demo.output_image.value == b"" and not demo.run_button.disabled

    demo.source.value = "sample"
    demo.task.value = "<OPEN_VOCABULARY_DETECTION>"
    demo.text.value = ""
    demo.run_button.click()
    assert "needs a text input" in demo.error.value

    demo.task.value = "<OD>"
    demo.run_button.click()  # a good run clears the error
    assert demo.last_result.ok and demo.error.layout.display == "none" and demo.output_image.value


def test_upload_and_path_sources(ov_tiny, tmp_path):
    demo = build_demo(*ov_tiny, generate_kwargs=FAST)
    picture = Image.new("RGB", (320, 200), (30, 120, 200))
    # What the browser sends when a file is chosen: the front end's serialised form of FileUpload.value.
    demo.upload.set_state({"value": [{"name": "blue.png", "type": "image/png", "size": 1,
                                      "content": memoryview(_png_bytes(picture)), "last_modified": 0}]})  # fmt: skip
    assert demo.source.value == "upload" and "320 × 200" in demo.image_info.value
    assert demo.upload.layout.display is None and demo.sample.layout.display == "none"
    demo.run_button.click()
    assert demo.last_result.ok and demo.last_result.image_drawn.size == (320, 200)

    path = tmp_path / "photo.png"
    picture.resize((100, 50)).save(path)
    demo.source.value = "path"
    demo.path.value = str(path)
    demo.run_button.click()
    assert demo.last_result.ok and demo.last_result.image_drawn.size == (100, 50)


def test_custom_samples_and_bad_arguments(ov_tiny, tmp_path):
    path = tmp_path / "mine.png"
    Image.new("RGB", (64, 48), "white").save(path)
    demo = build_demo(*ov_tiny, samples={"mine": path, "red": Image.new("RGB", (30, 20), "red")})
    assert [value for _, value in demo.sample.options] == ["mine", "red"]
    assert "64 × 48" in demo.image_info.value
    with pytest.raises(ValueError, match="Unknown samples"):
        build_demo(*ov_tiny, samples=["grace_hopper", "no_such_sample"])
    with pytest.raises(ValueError, match="default_sample"):
        build_demo(*ov_tiny, default_sample="nope")
    with pytest.raises(ValueError, match="Unknown task"):
        build_demo(*ov_tiny, default_task="<NOPE>")


# ---- the optional gradio app -----------------------------------------------------------------------------------


def test_gradio_callback_needs_no_gradio(ov_tiny, photo):
    from helpers.ui.gradio_app import gradio_callback, task_choices

    assert [value for _, value in task_choices()] == [*TASKS, *CASCADED_TASKS]
    callback = gradio_callback(*ov_tiny, **FAST)
    drawn, answer, status = callback(photo, "<OD>", "left over from another task")  # ignored: <OD> takes no text
    assert isinstance(drawn, Image.Image) and drawn.size == photo.size
    assert list(answer) == ["<OD>"] and "Answered in" in status and "`<OD>`" in status  # code span: not HTML
    drawn, answer, status = callback(None, "<OD>", "")
    assert drawn is None and answer == {} and status.startswith("⚠️") and "No image" in status


def test_gradio_missing_says_how_to_install(monkeypatch, ov_tiny):
    import sys

    from helpers.ui.gradio_app import build_gradio_app

    monkeypatch.setitem(sys.modules, "gradio", None)  # what a machine without gradio has
    with pytest.raises(ImportError, match="pip install gradio"):
        build_gradio_app(*ov_tiny)


def test_gradio_app_serves_on_localhost_only(ov_tiny):
    pytest.importorskip("gradio", reason="gradio is an optional extra (pip install gradio); app test skipped")
    import urllib.request

    from helpers.ui.gradio_app import HOST, build_gradio_app

    app = build_gradio_app(*ov_tiny, generate_kwargs=FAST)
    app.launch(server_name=HOST, share=False, prevent_thread_lock=True, quiet=True)
    try:
        assert app.server_name == "127.0.0.1" and app.share_url is None
        with urllib.request.urlopen(app.local_url, timeout=30) as response:
            assert response.status == 200 and b"gradio" in response.read().lower()
    finally:
        app.close()


def test_gradio_checks_the_pixel_count_before_decoding(ov_tiny, tmp_path, monkeypatch):
    import sys
    from unittest import mock

    from PIL import ImageFile

    from helpers.ui.gradio_app import build_gradio_app, gradio_callback

    fake_gradio = mock.MagicMock()  # records how the app asks gradio for the upload (gradio itself is optional)
    monkeypatch.setitem(sys.modules, "gradio", fake_gradio)
    build_gradio_app(*ov_tiny)
    upload = fake_gradio.Image.call_args_list[0].kwargs
    assert upload["type"] == "filepath" and upload["image_mode"] is None  # gradio then hands over the file undecoded

    big = tmp_path / "big.png"
    Image.new("RGB", (400, 300), "white").save(big)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100_000)  # 120,000 pixels: "huge" for this test
    decoded = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self.size) or real_load(self))
    drawn, answer, status = gradio_callback(*ov_tiny, **FAST)(str(big), "<OD>", "")
    assert drawn is None and "pixel safety limit" in status and decoded == []
