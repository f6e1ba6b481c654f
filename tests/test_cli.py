"""The single-image command line as a script would use it: stdout is the answer alone, as JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from helpers.tasks.run import TASKS, build_prompt, looks_like_pixel_box, parse_pixel_box, resolve_task

ROOT = Path(__file__).resolve().parent.parent


def run_cli(args: list[str], models_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "FLORENCE2_MODELS_DIR": str(models_dir), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    env.pop("FLORENCE2_KIT", None)
    return subprocess.run([sys.executable, "-m", "helpers", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=600)  # fmt: skip


@pytest.fixture(scope="module")
def photo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "photo.png"
    Image.new("RGB", (200, 160), (200, 40, 40)).save(path)
    return path


def test_first_run_stdout_is_only_the_json_answer(photo: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    """An empty model cache: the conversion's progress lines go to stderr, stdout still parses as JSON."""
    done = run_cli([str(photo), "--model", str(tiny_model_dir), "--task", "object detection", "--max-new-tokens",
                    "8", "--device", "CPU"], tmp_path / "models")  # fmt: skip
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert list(answer) == ["<OD>"]
    assert "converted" in done.stderr  # the first conversion happened, and said so where it belongs


def test_region_task_takes_the_pixel_box_the_messages_suggest(
    photo: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    done = run_cli([str(photo), "--model", str(tiny_model_dir), "--task", "<REGION_TO_CATEGORY>", "--text",
                    "55,42,146,133", "--max-new-tokens", "8", "--device", "CPU"], tmp_path / "models")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert list(json.loads(done.stdout)) == ["<REGION_TO_CATEGORY>"]


def test_help_shows_single_image_and_folder_use(tmp_path: Path) -> None:
    done = run_cli(["--help"], tmp_path)
    assert done.returncode == 0
    for option in ("--output-dir", "--coco", "--retry-errors", "--text", "photos/"):
        assert option in done.stdout


@pytest.mark.parametrize("token", list(TASKS))
def test_display_names_resolve_to_their_task(token: str) -> None:
    assert resolve_task(TASKS[token].name) == token
    assert resolve_task(TASKS[token].name.lower().replace(" ", "-")) == token


def test_common_words_and_suggestions() -> None:
    assert resolve_task("object detection") == "<OD>"
    assert resolve_task("ocr with regions") == "<OCR_WITH_REGION>"
    with pytest.raises(ValueError, match="Did you mean 'Object detection'|Did you mean '<OD>'"):
        resolve_task("object detecton")


def test_pixel_box_text_becomes_location_tokens() -> None:
    assert looks_like_pixel_box("55,42,146,133") and looks_like_pixel_box("(55 42 146 133)")
    assert not looks_like_pixel_box("<loc_1><loc_2><loc_3><loc_4>") and not looks_like_pixel_box("a red car")
    assert parse_pixel_box("55, 42, 146, 133") == (55, 42, 146, 133)
    from_text = build_prompt("<REGION_TO_CATEGORY>", "55,42,146,133", image_size=(200, 160))
    assert from_text == build_prompt("<REGION_TO_CATEGORY>", (55, 42, 146, 133), image_size=(200, 160))
    with pytest.raises(ValueError, match="needs the image size"):
        build_prompt("<REGION_TO_CATEGORY>", "55,42,146,133")
    with pytest.raises(ValueError, match="exactly 4"):
        build_prompt("<REGION_TO_CATEGORY>", "55,42,146", image_size=(200, 160))
