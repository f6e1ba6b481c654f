"""helpers.course.samples: shipped images load, are licensed, match their generators; names are validated."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers.course import samples
from helpers.course.samples import (
    GENERATORS,
    IMAGES_DIR,
    SAMPLE_DESCRIPTIONS,
    SAMPLE_IMAGES,
    list_samples,
    load_sample,
    sample_path,
    shapes_scene_answer,
)

LICENSES = IMAGES_DIR / "LICENSES.md"


@pytest.mark.parametrize("name", list(SAMPLE_IMAGES))
def test_each_sample_loads_as_rgb_with_a_sane_size(name: str) -> None:
    image = load_sample(name)
    assert isinstance(image, Image.Image) and image.mode == "RGB"
    assert 240 <= min(image.size) and max(image.size) <= 1024  # teaching scenes are drawn 240 to 400 px a side
    assert np.asarray(image).std() > 10  # a real picture, not a blank or truncated file
    path = sample_path(name)
    assert path.suffix in {".jpg", ".png"} and path.stat().st_size < 150 * 1024


def test_list_and_descriptions_cover_the_same_samples() -> None:
    assert list_samples() == list(SAMPLE_IMAGES) == list(SAMPLE_DESCRIPTIONS)
    assert len(set(SAMPLE_IMAGES.values())) == len(SAMPLE_IMAGES)
    for description in SAMPLE_DESCRIPTIONS.values():
        assert description.strip() and "\n" not in description
    assert {"text", "receipt", "shapes"} <= set(GENERATORS) <= set(SAMPLE_IMAGES)


def test_folder_holds_exactly_the_listed_files() -> None:
    shipped = {p.name for p in IMAGES_DIR.iterdir() if p.is_file()} - {"LICENSES.md"}
    assert shipped == set(SAMPLE_IMAGES.values())


def test_licenses_mention_every_shipped_file() -> None:
    text = LICENSES.read_text(encoding="utf-8")
    for file_name in SAMPLE_IMAGES.values():
        row = next((line for line in text.splitlines() if f"`{file_name}`" in line), None)
        assert row is not None, f"{file_name} missing from LICENSES.md"
        assert any(word in row for word in ("Public domain", "CC BY", "Apache-2.0")), f"{file_name}: no licence"


def test_grace_hopper_is_matplotlibs_original() -> None:
    import matplotlib

    original = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    assert sample_path("grace_hopper").read_bytes() == original.read_bytes()


def test_sklearn_photos_match_their_originals() -> None:
    """flower.jpg is a byte copy; pagoda.jpg is china.jpg re-encoded (JPEG q90 costs ~3 grey levels on average)."""
    sklearn = pytest.importorskip("sklearn")  # not a requirement of the collection, only where the photos came from
    folder = Path(sklearn.__file__).parent / "datasets" / "images"
    assert sample_path("flower").read_bytes() == (folder / "flower.jpg").read_bytes()
    china = np.asarray(Image.open(folder / "china.jpg"), dtype=float)
    pagoda = np.asarray(load_sample("pagoda"), dtype=float)
    assert pagoda.shape == china.shape and np.abs(pagoda - china).mean() < 5
    flower = np.asarray(load_sample("flower"), dtype=float)
    assert np.abs(flower - china).mean() > 30  # the bound above does tell different photos apart


def test_unknown_name_lists_valid_names() -> None:
    for bad in ["lena", "", "shapes.jpg", None, 3]:
        with pytest.raises(ValueError) as error:
            sample_path(bad)  # type: ignore[arg-type]
        for name in SAMPLE_IMAGES:
            assert name in str(error.value)
    with pytest.raises(ValueError, match="grace_hopper"):
        load_sample("nope")


def test_names_are_forgiving_about_case_and_extension() -> None:
    assert sample_path(" Shapes ") == sample_path("shapes") == sample_path("shapes.png") == IMAGES_DIR / "shapes.png"


def test_missing_file_explains_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(samples, "IMAGES_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match="--regenerate"):
        sample_path("text")


def test_loaded_images_are_independent() -> None:
    first = load_sample("shapes")
    first.paste((0, 0, 0), (0, 0, 50, 50))
    assert load_sample("shapes").getpixel((10, 10)) != (0, 0, 0)


@pytest.mark.parametrize("name", list(GENERATORS))
def test_generators_are_deterministic_and_match_the_shipped_files(name: str) -> None:
    first, second = GENERATORS[name](), GENERATORS[name]()
    assert first.mode == "RGB" and first.tobytes() == second.tobytes()
    shipped = load_sample(name)
    assert shipped.size == first.size
    # Exact here; the tolerance only absorbs font-rasteriser differences between FreeType builds.
    diff = np.abs(np.asarray(shipped, dtype=float) - np.asarray(first, dtype=float))
    assert diff.mean() < 0.5, f"{name}.png is stale: run `python -m helpers.course.samples --regenerate`"


def test_generators_follow_their_arguments() -> None:
    default = samples.render_text_image()
    other = samples.render_text_image([("Hello", "DejaVuSans.ttf", 30, (0, 0, 0))], size=(300, 100))
    assert other.size == (300, 100) and np.asarray(other).std() > 5 and default.size == (768, 432)
    assert samples.render_receipt(items=[("Tea", 1, "2.00")]).height < samples.render_receipt().height
    assert samples.render_shapes_scene((320, 240)).size == (320, 240)
    with pytest.raises(FileNotFoundError, match="ttf"):
        samples.font("NoSuchFont.ttf")


def test_text_sample_has_ink_on_every_line() -> None:
    ink = np.asarray(load_sample("text")).min(axis=-1) < 180  # darker than the cream background
    rows_with_ink = ink.any(axis=1)
    # Count separate bands of text rows: one per line of DEFAULT_TEXT_LINES.
    bands = np.count_nonzero(rows_with_ink[1:] & ~rows_with_ink[:-1]) + int(rows_with_ink[0])
    assert bands == len(samples.DEFAULT_TEXT_LINES)


def test_shapes_ground_truth_boxes_sit_on_their_shapes() -> None:
    answer = shapes_scene_answer()
    image = load_sample("shapes")
    assert len(answer["bboxes"]) == len(answer["labels"]) == len(samples.SHAPES)
    for box, (label, _, *_, fill) in zip(answer["bboxes"], samples.SHAPES):
        x1, y1, x2, y2 = box
        assert 0 <= x1 < x2 < image.width and 0 <= y1 < y2 < image.height
        centre = image.getpixel((round((x1 + x2) / 2), round((y1 + y2) / 2) + 3))  # +3: below the star's centre
        assert max(abs(a - b) for a, b in zip(centre, fill)) < 10, label
        corner_outside = image.getpixel((max(round(x1) - 4, 0), max(round(y1) - 4, 0)))
        assert max(abs(a - b) for a, b in zip(corner_outside, fill)) > 30, label


def test_regenerate_writes_identical_files(tmp_path: Path) -> None:
    written = samples.regenerate_samples(tmp_path / "in-process")
    assert sorted(p.name for p in written) == sorted(SAMPLE_IMAGES[n] for n in GENERATORS)
    for path in written:
        name = next(n for n, f in SAMPLE_IMAGES.items() if f == path.name)
        assert Image.open(path).convert("RGB").tobytes() == GENERATORS[name]().tobytes()


def test_module_entry_point(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    result = subprocess.run(
        [sys.executable, "-m", "helpers.course.samples", "--regenerate", "--output-dir", str(out)],
        capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == sorted(SAMPLE_IMAGES[n] for n in GENERATORS)
    assert "wrote" in result.stdout
    listing = subprocess.run(
        [sys.executable, "-m", "helpers.course.samples"], capture_output=True, text=True, check=True
    )
    assert all(name in listing.stdout for name in SAMPLE_IMAGES)


def test_teaching_scene_is_held_out_and_matches_its_ground_truth() -> None:
    from helpers.course.teaching.scenes import HELD_OUT_SEED

    scene = samples.teaching_scene()
    assert scene.seed == HELD_OUT_SEED and scene.index == samples.TEACHING_SCENE_INDEX
    assert scene.image.tobytes() == load_sample("teaching_scene").tobytes()
    assert 2 <= len(scene.objects) <= 4 and scene.text is not None
    truth = samples.teaching_scene_answer()
    assert sorted(truth["labels"]) == sorted(o.label for o in scene.objects)
    assert "held-out" in SAMPLE_DESCRIPTIONS["teaching_scene"]
    # The lessons ask about these two by name on every kind of model (05, 06, 08).
    assert {"red circle", "blue square"} <= set(truth["labels"])


@pytest.mark.parametrize("name", list(SAMPLE_IMAGES))
def test_lesson_image_keeps_the_sample_for_real_and_random_models(name: str, capsys: pytest.CaptureFixture) -> None:
    for kind in ("real", "random"):
        assert samples.lesson_sample(name, kind) == name
        assert samples.lesson_image(name, kind).tobytes() == load_sample(name).tobytes()
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("name", ["grace_hopper", "pagoda", "flower", "text", "receipt", "shapes"])
def test_lesson_image_shows_the_teaching_model_its_scene_and_says_why(name: str, capsys: pytest.CaptureFixture) -> None:
    image = samples.lesson_image(name, "teaching")
    assert image.tobytes() == load_sample("teaching_scene").tobytes()
    said = capsys.readouterr().out
    assert said.count("\n") == 1 and "teaching" in said and name in said
    assert samples.lesson_sample_path(name, "teaching") == sample_path("teaching_scene")
    capsys.readouterr()
    assert samples.lesson_sample("teaching_scene", "teaching") == "teaching_scene"
    assert capsys.readouterr().out == ""


def test_lesson_image_refuses_unknown_names() -> None:
    with pytest.raises(ValueError, match="grace_hopper"):
        samples.lesson_image("lena", "teaching")
