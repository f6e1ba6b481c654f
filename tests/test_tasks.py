"""helpers.tasks.run: the task table, prompts, regions, image loading and running tasks on the tiny PyTorch model."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from helpers.tasks.run import (
    ANSWER_KEYS,
    CASCADED_TASKS,
    FAMILY_NOTEBOOKS,
    TASKS,
    box_to_loc,
    build_prompt,
    format_region,
    load_image,
    loc_to_box,
    parse_region,
    resolve_task,
    run_cascaded_task,
    run_task,
    run_tasks_batch,
)

FAST = {"max_new_tokens": 20, "num_beams": 1}
REGION = "<loc_100><loc_200><loc_500><loc_700>"
ALL_15 = (
    "<CAPTION> <DETAILED_CAPTION> <MORE_DETAILED_CAPTION> <OD> <DENSE_REGION_CAPTION> <REGION_PROPOSAL> <OCR> "
    "<OCR_WITH_REGION> <CAPTION_TO_PHRASE_GROUNDING> <REFERRING_EXPRESSION_SEGMENTATION> <REGION_TO_SEGMENTATION> "
    "<OPEN_VOCABULARY_DETECTION> <REGION_TO_CATEGORY> <REGION_TO_DESCRIPTION> <REGION_TO_OCR>"
).split()
#: How the processor's own post-processing types map onto the table's answer kinds.
PARSE_TYPE_TO_ANSWER_KIND = {
    "pure_text": "text",
    "description_with_bboxes": "bboxes",
    "bboxes": "bboxes",
    "phrase_grounding": "bboxes",
    "polygons": "polygons",
    "description_with_bboxes_or_polygons": "open_vocabulary",
    "ocr": "quad_boxes",
}


def _noise(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return _noise(120, 80, seed=1)


def _text_for(task: str) -> str | None:
    spec = TASKS[task]
    return None if not spec.needs_text else REGION if spec.text_kind == "region" else "a red car"


def _manual(model, processor, image: Image.Image, prompt: str, task: str, **generate_kwargs) -> dict:
    """The pipeline written out by hand, as in transformers' Florence-2 docs."""
    inputs = processor(text=prompt, images=image, return_tensors="pt")
    ids = model.generate(**inputs, **generate_kwargs)
    text = processor.batch_decode(ids, skip_special_tokens=False)[0]
    return processor.post_process_generation(text, task=task, image_size=image.size)


# ---------------------------------------------------------------------------------------------------- the table


def test_table_has_exactly_the_15_tasks_and_agrees_with_the_processor(tiny_processor) -> None:
    assert len(TASKS) == 15 and sorted(TASKS) == sorted(ALL_15)
    assert set(TASKS) == set(tiny_processor.tasks_answer_post_processing_type)
    assert {t for t, s in TASKS.items() if s.needs_text} == set(tiny_processor.task_prompts_with_input)
    assert {t for t, s in TASKS.items() if not s.needs_text} == set(tiny_processor.task_prompts_without_inputs)
    for token, spec in TASKS.items():
        assert spec.token == token
        assert spec.family in FAMILY_NOTEBOOKS
        assert spec.needs_text == (spec.text_kind != "none")
        assert (spec.text_kind == "region") == token.startswith("<REGION_TO_")
        parse_type = tiny_processor.tasks_answer_post_processing_type[token]
        assert spec.answer_kind == PARSE_TYPE_TO_ANSWER_KIND[parse_type], token
        assert spec.hint and "\n" not in spec.hint and spec.name
    assert {s.family for s in TASKS.values()} == set(FAMILY_NOTEBOOKS)


def test_cascaded_tasks_are_one_per_caption_level() -> None:
    assert list(CASCADED_TASKS) == [
        "<CAPTION> + <CAPTION_TO_PHRASE_GROUNDING>",
        "<DETAILED_CAPTION> + <CAPTION_TO_PHRASE_GROUNDING>",
        "<MORE_DETAILED_CAPTION> + <CAPTION_TO_PHRASE_GROUNDING>",
    ]
    for name, spec in CASCADED_TASKS.items():
        assert spec.name == name and TASKS[spec.caption_task].family == "caption"


# ---------------------------------------------------------------------------------------------------- running


def _assert_structure(answer, kind: str) -> None:
    if kind == "text":
        assert isinstance(answer, str)
        assert "<s>" not in answer and "</s>" not in answer and "<pad>" not in answer
        return
    assert isinstance(answer, dict) and set(answer) == set(ANSWER_KEYS[kind])
    if kind == "open_vocabulary":
        assert len(answer["bboxes"]) == len(answer["bboxes_labels"])
        assert len(answer["polygons"]) == len(answer["polygons_labels"])
        boxes, polygons = answer["bboxes"], answer["polygons"]
    else:
        geometry = {"bboxes": "bboxes", "polygons": "polygons", "quad_boxes": "quad_boxes"}[kind]
        assert len(answer[geometry]) == len(answer["labels"])
        assert all(isinstance(label, str) for label in answer["labels"])
        boxes = answer["bboxes"] if kind == "bboxes" else []
        polygons = answer["polygons"] if kind == "polygons" else []
        for quad in answer.get("quad_boxes", []):
            assert len(quad) == 8 and all(isinstance(v, (int, float)) for v in quad)
    for box in boxes:
        assert len(box) == 4 and all(isinstance(v, (int, float)) for v in box)
    for instance in polygons:
        for polygon in instance:
            assert len(polygon) % 2 == 0


@pytest.mark.parametrize("task", ALL_15)
def test_every_task_returns_the_answer_kind_of_the_table(tiny_torch_model, tiny_processor, photo, task) -> None:
    result = run_task(tiny_torch_model, tiny_processor, photo, task, _text_for(task), **FAST)
    assert list(result) == [task]
    _assert_structure(result[task], TASKS[task].answer_kind)


@pytest.mark.parametrize(
    ("task", "text_input", "prompt", "generate_kwargs"),
    [
        ("<OD>", None, "<OD>", FAST),
        # no num_beams: run_task must leave the model's own generation config (3 beams) in charge
        ("<CAPTION>", None, "<CAPTION>", {"max_new_tokens": 12}),
        ("<CAPTION_TO_PHRASE_GROUNDING>", "  a red car ", "<CAPTION_TO_PHRASE_GROUNDING>a red car", FAST),
        ("<OCR_WITH_REGION>", None, "<OCR_WITH_REGION>", FAST),
    ],
)
def test_run_task_equals_the_hand_written_pipeline(
    tiny_torch_model, tiny_processor, photo, task, text_input, prompt, generate_kwargs
) -> None:
    expected = _manual(tiny_torch_model, tiny_processor, photo, prompt, task, **generate_kwargs)
    assert run_task(tiny_torch_model, tiny_processor, photo, task, text_input, **generate_kwargs) == expected


def test_region_task_with_a_pixel_box_equals_the_processors_quantisation(
    tiny_torch_model, tiny_processor, photo
) -> None:
    box = (10.0, 20.0, 90.0, 75.0)
    bins = tiny_processor.post_processor.quantize(torch.tensor([box], dtype=torch.float64), photo.size)[0].tolist()
    prompt = "<REGION_TO_SEGMENTATION>" + "".join(f"<loc_{b}>" for b in bins)
    expected = _manual(tiny_torch_model, tiny_processor, photo, prompt, "<REGION_TO_SEGMENTATION>", **FAST)
    assert run_task(tiny_torch_model, tiny_processor, photo, "region_to_segmentation", box, **FAST) == expected


def test_loose_task_names_and_paths(tiny_torch_model, tiny_processor, photo, tmp_path) -> None:
    path = tmp_path / "photo.png"
    photo.save(path)
    result = run_task(tiny_torch_model, tiny_processor, str(path), " od ", **FAST)
    assert result == _manual(tiny_torch_model, tiny_processor, photo, "<OD>", "<OD>", **FAST)
    for name in ("od", "<od>", "OD", "<OD>"):
        assert resolve_task(name) == "<OD>"
    assert resolve_task("region to category") == "<REGION_TO_CATEGORY>"
    assert resolve_task("caption-to-phrase-grounding") == "<CAPTION_TO_PHRASE_GROUNDING>"


def test_bfloat16_model_gets_matching_pixel_values(tiny_model_dir, tiny_processor, photo) -> None:
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).eval()
    result = run_task(model, tiny_processor, photo, "<CAPTION>", max_new_tokens=5, num_beams=1)
    assert isinstance(result["<CAPTION>"], str)


#: Four differently sized images: answers end at different lengths, so batched rows get padded.
BATCH_IMAGES = [(60, 40, 0), (60, 61, 3), (60, 68, 4), (60, 82, 6)]


@pytest.mark.parametrize(
    ("task", "text_inputs", "generate_kwargs"),
    [
        ("<CAPTION>", None, FAST),
        ("<OD>", None, FAST),
        # prompts of different lengths (padded) and beam search
        ("<CAPTION_TO_PHRASE_GROUNDING>", ["a red car", "a blue sky with a big yellow dog", "sky", "a cat"],
         {"max_new_tokens": 20}),
        ("<REGION_TO_CATEGORY>", [REGION, (5, 6, 50, 40), "<loc_0><loc_0><loc_999><loc_999>", (0, 0, 60, 82)], FAST),
    ],
)  # fmt: skip
def test_batch_equals_one_image_at_a_time(tiny_torch_model, tiny_processor, task, text_inputs, generate_kwargs):
    images = [_noise(w, h, seed) for w, h, seed in BATCH_IMAGES]
    texts = text_inputs or [None] * len(images)
    batch = run_tasks_batch(tiny_torch_model, tiny_processor, images, task, text_inputs, **generate_kwargs)
    single = [
        run_task(tiny_torch_model, tiny_processor, im, task, t, **generate_kwargs) for im, t in zip(images, texts)
    ]
    assert batch == single
    if task == "<CAPTION>":  # the premise that makes this case test the padding: some row really is padded
        inputs = tiny_processor(text=[task] * len(images), images=images, return_tensors="pt", padding=True)
        ids = tiny_torch_model.generate(**inputs, **generate_kwargs)
        assert (ids == tiny_processor.tokenizer.pad_token_id).any()
    if task == "<OD>":  # boxes on several images, so scaling each answer by the wrong image size would show
        assert sum(bool(answer["<OD>"]["bboxes"]) for answer in batch) >= 2


def test_batch_input_errors(tiny_torch_model, tiny_processor, photo) -> None:
    with pytest.raises(ValueError, match="one text input per image"):
        run_tasks_batch(tiny_torch_model, tiny_processor, [photo, photo], "<OPEN_VOCABULARY_DETECTION>", ["car"])
    with pytest.raises(ValueError, match="non-empty list"):
        run_tasks_batch(tiny_torch_model, tiny_processor, [], "<OD>")
    with pytest.raises(ValueError, match="non-empty list"):
        run_tasks_batch(tiny_torch_model, tiny_processor, photo, "<OD>")


def test_cascaded_task_returns_caption_and_its_grounding(tiny_torch_model, tiny_processor, photo) -> None:
    name = "<DETAILED_CAPTION> + <CAPTION_TO_PHRASE_GROUNDING>"
    result = run_cascaded_task(tiny_torch_model, tiny_processor, photo, name, **FAST)
    caption = run_task(tiny_torch_model, tiny_processor, photo, "<DETAILED_CAPTION>", **FAST)["<DETAILED_CAPTION>"]
    if caption.strip():
        grounding = _manual(
            tiny_torch_model, tiny_processor, photo, "<CAPTION_TO_PHRASE_GROUNDING>" + caption,
            "<CAPTION_TO_PHRASE_GROUNDING>", **FAST,
        )  # fmt: skip
    else:  # nothing to ground
        grounding = {"<CAPTION_TO_PHRASE_GROUNDING>": {"bboxes": [], "labels": []}}
    assert result == {"<DETAILED_CAPTION>": caption, **grounding}
    with pytest.raises(ValueError, match="Unknown cascaded task.*<CAPTION> \\+ <CAPTION_TO_PHRASE_GROUNDING>"):
        run_cascaded_task(tiny_torch_model, tiny_processor, photo, "<OD> + <CAPTION_TO_PHRASE_GROUNDING>")


@pytest.mark.parametrize("size", [(1, 1), (10000, 200)])
def test_very_thin_images_run(tiny_torch_model, tiny_processor, size) -> None:
    image = Image.new("RGB", size, (200, 30, 30))
    result = run_task(tiny_torch_model, tiny_processor, image, "<OD>", max_new_tokens=8, num_beams=1)
    for box in result["<OD>"]["bboxes"]:
        assert 0 <= box[0] <= size[0] and 0 <= box[1] <= size[1]


# ---------------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("value", "message"),
    [(0, "between 1 and 4096"), (-5, "between 1 and 4096"), (5000, "between 1 and 4096"),
     (1025, "1024 decoder positions"), (2.5, "integer"), (True, "integer")],
)  # fmt: skip
def test_max_new_tokens_is_validated(tiny_torch_model, tiny_processor, photo, value, message) -> None:
    with pytest.raises(ValueError, match=message):
        run_task(tiny_torch_model, tiny_processor, photo, "<OD>", max_new_tokens=value)


def test_too_long_text_input_is_refused_before_generating(tiny_torch_model, tiny_processor, photo) -> None:
    with pytest.raises(ValueError, match="encoder holds 1024.*Shorten"):
        run_task(tiny_torch_model, tiny_processor, photo, "<CAPTION_TO_PHRASE_GROUNDING>", "a red car " * 200)


@pytest.mark.parametrize(
    ("task", "text_input", "kwargs", "error", "message"),
    [
        ("<CAPTON>", None, {}, ValueError, r"Unknown task '<CAPTON>'\. Did you mean '<CAPTION>'\?.*<REGION_TO_OCR>"),
        ("object detection please", None, {}, ValueError, "Valid tasks.*<OD>"),
        ("<CAPTION> + <CAPTION_TO_PHRASE_GROUNDING>", None, {}, ValueError, "run_cascaded_task"),
        (None, None, {}, TypeError, "task must be a string"),
        ("<CAPTION_TO_PHRASE_GROUNDING>", None, {}, ValueError, "needs a text input.*Type a caption"),
        ("<OPEN_VOCABULARY_DETECTION>", "   ", {}, ValueError, "needs a text input"),
        ("<OD>", "a red car", {}, ValueError, "takes no text input.*<CAPTION_TO_PHRASE_GROUNDING>"),
        ("<CAPTION_TO_PHRASE_GROUNDING>", "find <OD> here", {}, ValueError, "contains the task token <OD>"),
        ("<REGION_TO_CATEGORY>", (1, 2, 3, 4), {}, ValueError, "needs the image size.*image_size=image.size"),
        ("<REGION_TO_CATEGORY>", "the dog", {}, ValueError, "not a <loc_N> token.*<loc_100><loc_200>"),
        ("<REGION_TO_CATEGORY>", (1, 2, 300, 4), {"image_size": (100, 50)}, ValueError, "100×50.*clip=True"),
        ("<REFERRING_EXPRESSION_SEGMENTATION>", (1, 2, 3, 4), {}, TypeError, "needs text"),
    ],
)
def test_build_prompt_errors_name_the_problem(task, text_input, kwargs, error, message) -> None:
    with pytest.raises(error, match=message):
        build_prompt(task, text_input, **kwargs)


def test_build_prompt_accepts_what_it_should() -> None:
    assert build_prompt("ocr") == "<OCR>"
    assert build_prompt("<OCR>", "") == "<OCR>"  # an empty text box in a UI means "no text"
    assert build_prompt("<REGION_TO_OCR>", f"  {REGION.replace('><', '> <')} ") == "<REGION_TO_OCR>" + REGION
    assert build_prompt("<REGION_TO_OCR>", (0, 0, 640, 480), image_size=(640, 480)) == (
        "<REGION_TO_OCR><loc_0><loc_0><loc_999><loc_999>"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("<loc_1><loc_2><loc_3>", "has 3 location tokens; a region needs exactly 4"),
        ("<loc_1><loc_2><loc_3><loc_4><loc_5>", "has 5 location tokens"),
        ("<loc_1><loc_2><loc_1000><loc_4>", "out of range"),
        ("<loc_1><loc_2><loc_007><loc_9>", "leading zeros; write <loc_7>"),
        ("<loc_1><loc_2><loc_-3><loc_4>", "not a <loc_N> token"),
        ("<loc_500><loc_2><loc_100><loc_4>", "need x1 <= x2 and y1 <= y2"),
        ("<loc_1><loc_700><loc_100><loc_4>", "need x1 <= x2 and y1 <= y2"),
        ("region <loc_1><loc_2><loc_3><loc_4>", "not a <loc_N> token"),
        ("", "empty"),
    ],
)
def test_parse_region_errors_show_a_valid_example(text, message) -> None:
    with pytest.raises(ValueError, match=message) as caught:
        parse_region(text)
    assert "<loc_100><loc_200><loc_500><loc_700>" in str(caught.value)


@pytest.mark.parametrize(
    ("box", "message"),
    [
        ((50, 10, 20, 30), "need x1 <= x2 and y1 <= y2"),
        ((1, 2, 3), "four finite numbers"),
        ((1, 2, 3, float("nan")), "four finite numbers"),
        ("1234", "string"),
        ((-1, 0, 10, 10), "outside the 640×480 .*clip=True"),
        ((0, 0, 10, 481), "outside the 640×480"),
    ],
)
def test_box_to_loc_errors(box, message) -> None:
    with pytest.raises(ValueError, match=message):
        box_to_loc(box, (640, 480))


def test_box_to_loc_clip_and_bad_image_size() -> None:
    assert box_to_loc((-20, -5, 700, 300), (640, 480), clip=True) == box_to_loc((0, 0, 640, 300), (640, 480))
    with pytest.raises(ValueError, match=r"image_size must be \(width, height\)"):
        box_to_loc((1, 2, 3, 4), (640,))
    with pytest.raises(ValueError, match="positive"):
        box_to_loc((0, 0, 0, 0), (0, 480))


# ---------------------------------------------------------------------------------------------------- regions

sizes = st.tuples(st.integers(1, 8000), st.integers(1, 8000))


@st.composite
def boxes_in_images(draw):
    width, height = draw(sizes)
    xs = sorted(draw(st.floats(0, width)) for _ in range(2))
    ys = sorted(draw(st.floats(0, height)) for _ in range(2))
    return (xs[0], ys[0], xs[1], ys[1]), (width, height)


@settings(max_examples=300, deadline=None)
@given(boxes_in_images())
def test_box_to_loc_quantises_like_florence2_and_round_trips_within_a_bin(tiny_processor, case) -> None:
    box, size = case
    loc = box_to_loc(box, size)
    bins = list(parse_region(loc))
    post = tiny_processor.post_processor
    assert bins == post.quantize(torch.tensor([box], dtype=torch.float64), size)[0].tolist()
    back = loc_to_box(loc, size)
    assert [int(v) for v in back] == post.dequantize(torch.tensor([bins]), size)[0].tolist()
    for original, restored, extent in zip(box, back, size * 2):
        assert abs(original - restored) <= extent / 1000 + 1e-9


ordered_bins = st.tuples(st.integers(0, 999), st.integers(0, 999), st.integers(0, 999), st.integers(0, 999)).map(
    lambda b: (min(b[0], b[2]), min(b[1], b[3]), max(b[0], b[2]), max(b[1], b[3]))
)


@settings(max_examples=300, deadline=None)
@given(ordered_bins)
def test_region_string_round_trip(bins) -> None:
    text = format_region(bins)
    assert parse_region(text) == bins
    assert format_region(parse_region(text)) == text


region_like = st.lists(
    st.one_of(
        st.integers(-5, 1500).map(lambda n: f"<loc_{n}>"),
        st.sampled_from(["<loc_", ">", "<", " ", "<loc_0", "<loc_>", "\n", "٣", "<loc_٣>", "<loc_0007>", "x"]),
        st.text(max_size=5),
    ),
    max_size=8,
).map("".join)


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.text(), region_like))
def test_parse_region_only_ever_raises_value_error(text) -> None:
    try:
        bins = parse_region(text)
    except ValueError as error:
        assert "<loc_100><loc_200><loc_500><loc_700>" in str(error)
    else:
        assert len(bins) == 4 and all(0 <= b <= 999 for b in bins)
        assert bins[0] <= bins[2] and bins[1] <= bins[3]


# ---------------------------------------------------------------------------------------------------- images


def test_load_image_modes() -> None:
    gray = load_image(Image.new("L", (4, 3), 77))
    assert gray.mode == "RGB" and gray.size == (4, 3) and gray.getpixel((0, 0)) == (77, 77, 77)

    rgba = Image.new("RGBA", (2, 1), (0, 0, 0, 0))
    rgba.putpixel((1, 0), (10, 20, 30, 255))
    out = load_image(rgba)
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 0)) == (10, 20, 30)
    assert rgba.mode == "RGBA"  # the caller's image is untouched

    assert load_image(Image.new("LA", (2, 2), (0, 0))).getpixel((1, 1)) == (255, 255, 255)

    palette = Image.new("P", (2, 2), 1)
    palette.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    assert load_image(palette).getpixel((0, 0)) == (200, 100, 50)
    palette.info["transparency"] = 1
    assert load_image(palette).getpixel((0, 0)) == (255, 255, 255)

    assert load_image(Image.new("1", (3, 3), 1)).getpixel((2, 2)) == (255, 255, 255)

    cmyk = load_image(Image.new("CMYK", (2, 2), (0, 255, 255, 0)))
    assert cmyk.mode == "RGB" and cmyk.getpixel((0, 0)) == (255, 0, 0)


def test_load_image_scales_high_bit_depth_instead_of_clipping(tmp_path) -> None:
    values = np.array([[0, 257 * 100, 40000, 65535]], dtype=np.uint16)
    image16 = Image.fromarray(values)
    assert image16.mode == "I;16"
    path = tmp_path / "deep.png"
    image16.save(path)
    for source in (image16, path):
        out = load_image(source)
        assert [out.getpixel((x, 0))[0] for x in range(4)] == [0, 100, round(40000 / 257), 255]

    floats = load_image(Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)))
    assert [floats.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]

    ints = load_image(Image.fromarray(np.array([[0, 65535]], dtype=np.int32)))
    assert [ints.getpixel((x, 0))[0] for x in range(2)] == [0, 255]


def test_load_image_applies_exif_orientation(tmp_path) -> None:
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 10, 20))  # red strip on the left edge as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    path = tmp_path / "phone.jpg"
    image.save(path, exif=exif, quality=95)
    for source in (path, str(path), Image.open(path)):
        out = load_image(source)
        assert out.size == (20, 40)
        red, green, blue = out.getpixel((10, 2))  # the left strip is now on top
        assert red > 200 and blue < 60


def test_load_image_path_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="not found: .*missing.jpg.*Check the path"):
        load_image(tmp_path / "missing.jpg")

    text = tmp_path / "notes.jpg"
    text.write_text("this is not an image")
    with pytest.raises(ValueError, match="not an image Pillow can read"):
        load_image(text)

    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty \(0 bytes\)"):
        load_image(empty)

    with pytest.raises(ValueError, match="is a folder"):
        load_image(tmp_path)

    buffer = io.BytesIO()
    _noise(64, 64, seed=3).save(buffer, "JPEG")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt.*re-download"):
        load_image(truncated)
    with pytest.raises(ValueError, match="re-save or re-download"):
        load_image(Image.open(truncated))

    with pytest.raises(TypeError, match="PIL.Image.Image or a file path"):
        load_image(np.zeros((4, 4, 3), dtype=np.uint8))


def _png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and header claiming a huge size: Pillow reads the size without decoding pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_load_image_refuses_decompression_bombs_and_empty_images(tmp_path, monkeypatch) -> None:
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header_only(100_000, 100_000))
    with pytest.raises(ValueError, match="safety limit.*MAX_IMAGE_PIXELS"):
        load_image(bomb)

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ValueError, match="100×100 = 10,000 pixels, above the 1,000-pixel safety limit"):
        load_image(Image.new("RGB", (100, 100)))
    small = tmp_path / "small.png"
    Image.new("RGB", (40, 30)).save(small)  # between Pillow's warning and error thresholds
    with pytest.raises(ValueError, match="40×30 = 1,200 pixels"):
        load_image(small)

    with pytest.raises(ValueError, match=r"zero size \(0×10\)"):
        load_image(Image.new("RGB", (0, 10)))


def test_load_image_keeps_thin_images() -> None:
    for size in [(1, 1), (10000, 200)]:
        out = load_image(Image.new("L", size, 5))
        assert out.size == size and out.mode == "RGB"


@pytest.mark.parametrize(
    ("answer", "problem"),
    [
        ({"bboxes": [[1, 2, 3, 4]]}, "needs the keys"),
        ({"bboxes": [[1, 2, 3, 4]], "labels": []}, "1 boxes but 0 labels"),
        ({"bboxes": [[1, 2, 3]], "labels": ["a"]}, "four numbers"),
        ({"bboxes": [[1, 2, 3, "4"]], "labels": ["a"]}, "four numbers"),
        ({"bboxes": [[1, 2, 3, 4]], "labels": [7]}, "must be strings"),
        ("a caption", "needs the keys"),
    ],
)
def test_check_box_answer_names_what_is_wrong(answer, problem) -> None:
    from helpers.tasks.run import check_box_answer

    with pytest.raises(ValueError, match=problem):
        check_box_answer(answer)


def test_check_box_answer_counts_well_formed_boxes() -> None:
    from helpers.tasks.run import check_box_answer

    answer = {"bboxes": [[1.5, 2, 3, 4], [0, 0, 9, 9]], "bboxes_labels": ["cat", ""], "polygons": []}
    assert check_box_answer(answer, "bboxes", "bboxes_labels") == 2
    assert check_box_answer({"bboxes": [], "labels": []}) == 0
