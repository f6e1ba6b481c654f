"""helpers.cli.batch and `python -m helpers FOLDER_OR_GLOB`: JSONL per image, COCO, drawings, resume, failures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers.cli.batch import find_images, process_images, read_results, wants_batch
from helpers.outputs.scores import run_task_with_scores

FAST = {"max_new_tokens": 12, "num_beams": 1}
GOOD = ["a.png", "b.jpg", "c.png"]


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Three small images of different sizes, one corrupt "image" and a file that is not an image."""
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name, (w, h) in zip(GOOD, [(64, 48), (40, 72), (96, 32)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(images / name)
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG")
    (images / "notes.txt").write_text("not an image")
    return images


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_folder_gives_jsonl_coco_and_drawings(folder, tmp_path, tiny_torch_model, tiny_processor) -> None:
    out = tmp_path / "out"
    summary = process_images(tiny_torch_model, tiny_processor, folder, ["od", "<CAPTION>"], out, batch_size=2,
                             coco=True, draw=True, progress=False, **FAST)  # fmt: skip
    assert (summary.processed, summary.skipped, summary.failed) == (3, 0, ["broken.jpg"])
    records = {r["file"]: r for r in lines(out / "results.jsonl")}
    assert sorted(records) == sorted([*GOOD, "broken.jpg"])
    broken = records["broken.jpg"]
    assert broken["error"] and broken["results"] == {} and "width" not in broken
    for name in GOOD:
        record = records[name]
        assert "error" not in record
        assert (record["width"], record["height"]) == Image.open(folder / name).size
        assert set(record["results"]) == {"<OD>", "<CAPTION>"} and isinstance(record["results"]["<CAPTION>"], str)
        od = record["results"]["<OD>"]
        assert len(od["scores"]) == len(od["bboxes"]) == len(od["labels"])
        for task in ("od", "caption"):
            assert (out / "drawings" / f"{name}.{task}.png").is_file()
    # A batched answer is the single-image answer (with the same scores).
    single = run_task_with_scores(tiny_torch_model, tiny_processor, folder / "a.png", "<OD>", **FAST)["<OD>"]
    assert records["a.png"]["results"]["<OD>"]["bboxes"] == single["bboxes"]
    np.testing.assert_allclose(records["a.png"]["results"]["<OD>"]["scores"], single["scores"], atol=1e-5)

    coco = json.loads((out / "coco.json").read_text())
    assert sorted(i["file_name"] for i in coco["images"]) == GOOD
    boxes = sum(len(records[n]["results"]["<OD>"]["bboxes"]) for n in GOOD)
    # Boxes without area are left out of COCO and counted (the tiny random model draws some).
    assert len(coco["annotations"]) + coco["info"]["skipped_instances"] == boxes > 0
    assert all(a["area"] > 0 for a in coco["annotations"])
    assert all(a["task"] == "<OD>" and 0 <= a["score"] <= 1 for a in coco["annotations"])
    category_ids = {c["id"] for c in coco["categories"]}
    assert all(a["category_id"] in category_ids for a in coco["annotations"])

    before = (out / "results.jsonl").read_bytes()
    again = process_images(tiny_torch_model, tiny_processor, folder, ["<OD>", "<CAPTION>"], out, coco=True,
                           progress=False, **FAST)  # fmt: skip
    assert (again.processed, again.skipped, again.failed, again.skipped_failed) == (0, 3, [], ["broken.jpg"])
    assert (out / "results.jsonl").read_bytes() == before  # nothing new was run or written


def test_interrupted_run_finishes_only_the_rest(folder, tmp_path, tiny_torch_model, tiny_processor) -> None:
    out = tmp_path / "out"
    process_images(tiny_torch_model, tiny_processor, folder, "<OD>", out, progress=False, **FAST)
    # What a killed run leaves: one finished line (with an answer no model would give: it must survive untouched)
    # and half of the next line.
    records, _ = read_results(out / "results.jsonl")
    marker = {"bboxes": [[1, 2, 3, 4]], "labels": ["left from the first run"], "scores": [0.5]}
    first = {**records["a.png"], "results": {"<OD>": marker}}
    torn = json.dumps(records["b.jpg"])[:20]
    (out / "results.jsonl").write_text(json.dumps(first) + "\n" + torn, encoding="utf-8")
    summary = process_images(tiny_torch_model, tiny_processor, str(folder), "<OD>", out, batch_size=4, coco=True,
                             progress=False, **FAST)  # fmt: skip
    assert (summary.processed, summary.skipped, summary.failed) == (2, 1, ["broken.jpg"])
    assert summary.repaired and summary.unreadable_lines == 0  # the torn line was removed, not kept forever
    records, bad = read_results(out / "results.jsonl")
    assert bad == 0 and sorted(records) == sorted([*GOOD, "broken.jpg"])
    assert records["a.png"] == first
    assert all("<OD>" in records[n]["results"] for n in GOOD)
    coco = json.loads((out / "coco.json").read_text())
    assert "left from the first run" in {c["name"] for c in coco["categories"]}

    # A new task later runs only that task, keeping the earlier answers; unreadable images stay skipped...
    more = process_images(tiny_torch_model, tiny_processor, folder, ["<OD>", "<REGION_PROPOSAL>"], out,
                          progress=False, **FAST)  # fmt: skip
    assert (more.processed, more.skipped, more.skipped_failed) == (3, 0, ["broken.jpg"])
    records, _ = read_results(out / "results.jsonl")
    assert records["a.png"]["results"]["<OD>"] == marker and "<REGION_PROPOSAL>" in records["a.png"]["results"]
    assert records["a.png"]["width"] == 64
    # ... unless asked to retry them.
    retry = process_images(tiny_torch_model, tiny_processor, folder, ["<OD>"], out, retry_errors=True,
                           progress=False, **FAST)  # fmt: skip
    assert (retry.processed, retry.skipped, retry.failed) == (0, 3, ["broken.jpg"])


def test_one_bad_text_input_is_refused_before_any_image(folder, tmp_path, tiny_torch_model, tiny_processor) -> None:
    with pytest.raises(ValueError, match="needs a text input"):
        process_images(tiny_torch_model, tiny_processor, folder, ["<CAPTION_TO_PHRASE_GROUNDING>"], tmp_path / "o")
    assert not (tmp_path / "o" / "results.jsonl").exists()
    with pytest.raises(ValueError, match="batch_size"):
        process_images(tiny_torch_model, tiny_processor, folder, ["<OD>"], tmp_path / "o", batch_size=0)


def test_finding_images(folder, tmp_path) -> None:
    root, files = find_images(folder)
    assert root == folder and [f.name for f in files] == sorted([*GOOD, "broken.jpg"])
    (folder / "sub").mkdir()
    Image.new("RGB", (8, 8)).save(folder / "sub" / "d.png")
    assert len(find_images(folder)[1]) == 4 and len(find_images(folder, recursive=True)[1]) == 5
    root, files = find_images(f"{folder}/**/*.png")
    assert root == folder and [f.relative_to(root).as_posix() for f in files] == ["a.png", "c.png", "sub/d.png"]
    with pytest.raises(ValueError, match="matches no files"):
        find_images(f"{folder}/*.gif")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="No images in"):
        find_images(tmp_path / "empty")


def test_command_line_tells_folders_and_globs_from_images(folder) -> None:
    assert wants_batch([str(folder)]) and wants_batch([f"{folder}/*.png", "--task", "<OD>"])
    assert wants_batch(["--task", "<OD>", "--batch-size", "2", str(folder), "--coco"])
    assert not wants_batch([str(folder / "a.png"), "--task", "<OD>"])
    assert not wants_batch(["--text", str(folder), str(folder / "a.png")])  # a folder given as an option value
    assert not wants_batch(["--out", str(folder), str(folder / "a.png")]) and not wants_batch([])


@pytest.mark.slow
def test_python_m_helpers_runs_a_glob_and_still_runs_one_image(folder, tmp_path, tiny_model_dir, capsys) -> None:
    from helpers.cli.main import main

    common = ["--model", str(tiny_model_dir), "--device", "CPU", "--max-new-tokens", "8", "--num-beams", "1"]
    out = tmp_path / "cli"
    status = main([f"{folder}/*.*", "--task", "<OD>", "--task", "<OCR_WITH_REGION>", "--output-dir", str(out),
                   "--coco", "--batch-size", "3", "--quiet", *common])  # fmt: skip
    assert status == 1  # notes.txt and broken.jpg cannot be read: reported, not fatal
    records = {r["file"]: r for r in lines(out / "results.jsonl")}
    assert sorted(records) == sorted([*GOOD, "broken.jpg", "notes.txt"])
    assert all(set(records[n]["results"]) == {"<OD>", "<OCR_WITH_REGION>"} for n in GOOD)
    assert "scores" in records["c.png"]["results"]["<OCR_WITH_REGION>"]
    assert json.loads((out / "coco.json").read_text())["images"]
    assert "3 images answered" in capsys.readouterr().err
    facts = json.loads((out / "summary.json").read_text())
    assert facts["engine"] == "local" and facts["images_answered"] == 5
    assert 200 < facts["peak_rss_mb"] < 20_000  # this process's peak: python, torch, the model (not a page count)

    assert main([str(folder / "a.png"), "--task", "<OD>", *common]) == 0  # one image: JSON answer on stdout
    assert set(json.loads(capsys.readouterr().out)) == {"<OD>"}


# ---- Resume keyed on what was asked (issue 17) -----------------------------------------------------------------


def _same_names_other_pixels(folder: Path, target: Path) -> Path:
    """A second "day" of photos with the same file names as ``folder`` but other pictures."""
    target.mkdir()
    rng = np.random.default_rng(1)
    for name in GOOD:
        w, h = Image.open(folder / name).size
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(target / name)
    return target


def test_an_output_folder_answers_one_request(folder, tmp_path, tiny_torch_model, tiny_processor) -> None:
    from helpers.cli.batch import RequestMismatchError

    out = tmp_path / "out"
    process_images(tiny_torch_model, tiny_processor, folder, "<OD>", out, progress=False, **FAST)
    before = (out / "results.jsonl").read_bytes()
    day_b = _same_names_other_pixels(folder, tmp_path / "dayB")
    with pytest.raises(RequestMismatchError, match="images: this folder holds answers for .*images, this run reads"):
        process_images(tiny_torch_model, tiny_processor, day_b, "<OD>", out, progress=False, **FAST)
    with pytest.raises(RequestMismatchError, match=r"<OD>: generate was .*'max_new_tokens': 12.*'max_new_tokens': 9"):
        process_images(tiny_torch_model, tiny_processor, folder, "<OD>", out, progress=False,
                       **{**FAST, "max_new_tokens": 9})  # fmt: skip
    with pytest.raises(RequestMismatchError, match="scores was True, now False"):
        process_images(tiny_torch_model, tiny_processor, folder, "<OD>", out, scores=False, progress=False, **FAST)
    assert (out / "results.jsonl").read_bytes() == before  # a refused run writes nothing

    # --update answers again exactly the images answered with other settings, and says so.
    updated = process_images(tiny_torch_model, tiny_processor, folder, "<OD>", out, update=True, progress=False,
                             **{**FAST, "max_new_tokens": 9})  # fmt: skip
    assert (updated.processed, sorted(updated.updated), updated.skipped) == (3, sorted(GOOD), 0)
    records, _ = read_results(out / "results.jsonl")
    single = run_task_with_scores(tiny_torch_model, tiny_processor, folder / "b.jpg", "<OD>",
                                  **{**FAST, "max_new_tokens": 9})["<OD>"]  # fmt: skip
    assert records["b.jpg"]["results"]["<OD>"]["bboxes"] == single["bboxes"]
    again = process_images(tiny_torch_model, tiny_processor, folder, "<OD>", out, progress=False,
                           **{**FAST, "max_new_tokens": 9})  # fmt: skip
    assert (again.processed, again.skipped, again.updated) == (0, 3, [])


def test_a_changed_image_is_answered_again(folder, tmp_path, tiny_torch_model, tiny_processor) -> None:
    out = tmp_path / "out"
    process_images(tiny_torch_model, tiny_processor, folder, "<CAPTION>", out, progress=False, **FAST)
    old = read_results(out / "results.jsonl")[0]["c.png"]
    Image.open(_same_names_other_pixels(folder, tmp_path / "other") / "c.png").save(folder / "c.png")
    summary = process_images(tiny_torch_model, tiny_processor, folder, "<CAPTION>", out, progress=False, **FAST)
    assert (summary.processed, summary.changed, summary.skipped) == (1, ["c.png"], 2)
    new = read_results(out / "results.jsonl")[0]["c.png"]
    assert new["sha256"] != old["sha256"]
    from helpers.tasks.run import run_task

    expected = run_task(tiny_torch_model, tiny_processor, folder / "c.png", "<CAPTION>", **FAST)
    assert new["results"]["<CAPTION>"] == expected["<CAPTION>"]


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [("max_new_tokens", 0, "between 1 and"), ("max_new_tokens", -1, "between 1 and"),
     ("max_new_tokens", 1.5, "must be an integer"), ("num_beams", 0, "at least 1"), ("num_beams", -1, "at least 1"),
     ("num_beams", 1.5, "whole number"), ("min_new_tokens", -1, "at least 0"),
     ("min_new_tokens", 1.5, "whole number")],
)  # fmt: skip
def test_settings_are_checked_before_any_image(folder, tmp_path, tiny_torch_model, tiny_processor,
                                               setting, value, message) -> None:  # fmt: skip
    with pytest.raises(ValueError, match=f"{setting}.*{message}|{message}.*{setting}"):
        process_images(tiny_torch_model, tiny_processor, folder, "<OD>", tmp_path / "o", progress=False,
                       **{**FAST, setting: value})  # fmt: skip
    assert not (tmp_path / "o" / "results.jsonl").exists()


def test_cli_refuses_a_mistyped_setting_and_says_how_to_retry(folder, tmp_path, capsys) -> None:
    from helpers.cli.batch import main

    status = main([str(folder), "--max-new-tokens", "0", "--output-dir", str(tmp_path / "o"), "--quiet"])
    assert status == 2 and "max_new_tokens must be between 1" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_failures_caused_by_the_request_are_retried(folder, tmp_path, tiny_torch_model, tiny_processor,
                                                     monkeypatch, capsys) -> None:  # fmt: skip
    from helpers.cli.batch import describe

    out = tmp_path / "out"
    real_generate = tiny_torch_model.generate

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("not enough memory")

    monkeypatch.setattr(tiny_torch_model, "generate", out_of_memory)
    first = process_images(tiny_torch_model, tiny_processor, folder, "<OD>", out, progress=False, **FAST)
    assert sorted(first.failed) == sorted([*GOOD, "broken.jpg"])
    records, _ = read_results(out / "results.jsonl")
    assert records["a.png"]["error_cause"] == "request" and records["broken.jpg"]["error_cause"] == "image"
    monkeypatch.setattr(tiny_torch_model, "generate", real_generate)
    second = process_images(tiny_torch_model, tiny_processor, folder, "<OD>", out, progress=False, **FAST)
    assert (second.processed, sorted(second.retried), second.skipped_failed) == (3, sorted(GOOD), ["broken.jpg"])
    text = describe(second)
    assert "3 retried after an earlier failure" in text and "rerun with --retry-errors" in text
    assert all("error" not in read_results(out / "results.jsonl")[0][name] for name in GOOD)


def test_one_writer_per_output_folder(folder, tmp_path, tiny_torch_model, tiny_processor) -> None:
    import subprocess
    import sys

    from helpers.cli.batch import BatchLockedError, output_lock

    out = tmp_path / "out"
    with output_lock(out):
        with pytest.raises(BatchLockedError, match=r"Another run \(process \d+\) is writing"):
            process_images(tiny_torch_model, tiny_processor, folder, "<OD>", out, progress=False, **FAST)
    assert not (out / "results.jsonl").exists()
    # A lock left by a run that was killed (its pid is gone) is taken over.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / ".lock").write_text(dead.stdout.strip())
    summary = process_images(tiny_torch_model, tiny_processor, folder, "<OD>", out, progress=False, **FAST)
    assert summary.processed == 3


# ---- Odd file names and symlink loops (issue 17) -----------------------------------------------------------------


def test_a_name_that_is_not_utf8_never_stops_a_run(folder, tmp_path, tiny_torch_model, tiny_processor) -> None:
    import os

    from helpers.cli.batch import describe

    good_odd = os.fsdecode(bytes(folder) + b"/caf\xe9.png")  # Latin-1 bytes: not valid UTF-8
    broken_odd = os.fsdecode(bytes(folder) + b"/bad\xff.jpg")
    Image.new("RGB", (20, 30), "red").save(good_odd)
    Path(broken_odd).write_bytes(b"not an image")
    out = tmp_path / "out"
    summary = process_images(tiny_torch_model, tiny_processor, folder, "<OD>", out, coco=True, progress=False,
                             **FAST)  # fmt: skip
    assert summary.processed == 4 and sorted(summary.failed) == sorted(["broken.jpg", Path(broken_odd).name])
    (out / "results.jsonl").read_bytes().decode("utf-8")  # still valid UTF-8 for every other reader
    records, bad = read_results(out / "results.jsonl")
    assert bad == 0 and records[Path(good_odd).name]["results"]["<OD>"] is not None
    assert "bad\\xff.jpg" in describe(summary)  # named in its error line, printably
    again = process_images(tiny_torch_model, tiny_processor, folder, "<OD>", out, progress=False, **FAST)
    assert (again.processed, again.skipped) == (0, 4)  # the odd names resume like any other


def test_symlink_loops_are_followed_once(folder) -> None:
    (folder / "sub").mkdir()
    Image.new("RGB", (8, 8)).save(folder / "sub" / "d.png")
    (folder / "sub" / "up").symlink_to(folder, target_is_directory=True)
    (folder / "loop").symlink_to(folder / "sub", target_is_directory=True)
    names = ["a.png", "c.png", "sub/d.png"]
    root, files = find_images(f"{folder}/**/*.png")
    assert sorted(f.relative_to(root).as_posix() for f in files) == names
    root, files = find_images(folder, recursive=True)
    assert len(files) == len({f.resolve() for f in files}) == 5
