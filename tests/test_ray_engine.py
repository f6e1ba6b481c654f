"""helpers.cli.ray_engine and `python -m helpers FOLDER --engine ray`, on a local Ray cluster of 2 CPUs.

One cluster for the whole session (started and stopped here); the teaching model, a handful of held-out scenes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from helpers.cli.ray_engine import keep_local_cluster_on_loopback

keep_local_cluster_on_loopback()  # before Ray is imported: the test cluster listens on 127.0.0.1 only
ray = pytest.importorskip("ray")

from helpers.cli.batch import process_images, read_results  # noqa: E402
from helpers.cli.ray_engine import label_on_ray  # noqa: E402
from helpers.course.teaching.scenes import HELD_OUT_SEED, make_scene  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MODEL = "teaching"
FAST = {"max_new_tokens": 40}


@pytest.fixture(scope="session")
def cluster():
    """A local Ray cluster with 2 CPUs, shared by every test of the session."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    assert {node["NodeManagerAddress"] for node in ray.nodes()} == {"127.0.0.1"}, "the test cluster left loopback"
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def scene_folder(folder: Path, count: int, *, broken: bool = False) -> Path:
    folder.mkdir(parents=True)
    for index in range(count):
        make_scene(HELD_OUT_SEED, index).image.save(folder / f"scene_{index:03d}.png")
    if broken:
        (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but then nothing an image decoder can read")
    return folder


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.mark.slow
def test_ray_gives_the_one_process_answers_and_records_a_corrupt_image(cluster, tmp_path) -> None:
    from helpers.course.checkpoints import load_model

    folder = scene_folder(tmp_path / "scenes", 6, broken=True)
    model, processor = load_model(MODEL, "fp16", "CPU")
    local = process_images(model, processor, folder, ["<OD>", "<CAPTION>"], tmp_path / "local", batch_size=3,
                           coco=True, progress=False, **FAST)  # fmt: skip
    distributed = label_on_ray(MODEL, folder, ["<OD>", "<CAPTION>"], tmp_path / "ray", workers=2, batch_size=3,
                               coco=True, draw=True, progress=False, **FAST)  # fmt: skip
    assert (distributed.processed, distributed.failed) == (local.processed, local.failed) == (6, ["broken.png"])

    expected, _ = read_results(tmp_path / "local" / "results.jsonl")
    records = lines(tmp_path / "ray" / "results.jsonl")
    assert sorted(r["file"] for r in records) == sorted(expected)  # one line per image, none twice
    assert "error" in {r["file"]: r for r in records}["broken.png"]
    for record in records:
        want = expected[record["file"]]
        for field in ("sha256", "width", "height", "requests", "error_cause"):  # same image, same request keys
            assert record.get(field) == want.get(field), (record["file"], field)
        if "error" in record:
            continue
        assert record["results"]["<CAPTION>"] == want["results"]["<CAPTION>"]
        got, ref = record["results"]["<OD>"], want["results"]["<OD>"]
        assert (got["labels"], got["bboxes"]) == (ref["labels"], ref["bboxes"]), record["file"]
        np.testing.assert_allclose(got["scores"], ref["scores"], atol=1e-5)
        assert (tmp_path / "ray" / "drawings" / f"{record['file']}.od.png").is_file()
    assert sum(len(r["results"]["<OD>"]["bboxes"]) for r in records if "error" not in r) > 0  # a model that finds boxes
    coco, local_coco = (json.loads((tmp_path / engine / "coco.json").read_text()) for engine in ("ray", "local"))
    assert coco["images"] == local_coco["images"] and coco["categories"] == local_coco["categories"]
    assert [a["bbox"] for a in coco["annotations"]] == [a["bbox"] for a in local_coco["annotations"]]
    facts = json.loads((tmp_path / "ray" / "summary.json").read_text())
    assert facts["engine"] == "ray" and facts["workers"] == 2 and facts["images_answered"] == 7
    assert facts["model_dirs_loaded"] == [str(model.model_dir)]  # the model the actors really loaded
    assert facts["ov_configs"] == [{"ENABLE_CPU_PINNING": False, "INFERENCE_NUM_THREADS": 1}]
    assert facts["images_per_second"] > 0 and facts["images_missing"] == 0

    again = label_on_ray(MODEL, folder, ["<OD>", "<CAPTION>"], tmp_path / "ray", workers=2, progress=False, **FAST)
    assert (again.processed, again.skipped, again.skipped_failed) == (0, 6, ["broken.png"])  # no actor even started
    # The engines share one output folder: the same request, so the one-process engine finds nothing left to do.
    local_again = process_images(model, processor, folder, ["<OD>", "<CAPTION>"], tmp_path / "ray", batch_size=3,
                                 progress=False, **FAST)  # fmt: skip
    assert (local_again.processed, local_again.skipped) == (0, 6)
    assert len(lines(tmp_path / "ray" / "results.jsonl")) == 7


@pytest.mark.slow
def test_killed_driver_resumes_without_losing_or_repeating_an_image(cluster, tmp_path) -> None:
    folder = scene_folder(tmp_path / "scenes", 10)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "helpers", str(folder), "--task", "<OD>", "--output-dir", str(out),
               "--engine", "ray", "--workers", "2", "--ray-address", cluster, "--batch-size", "1", "--model", MODEL,
               "--device", "CPU", "--max-new-tokens", "40", "--quiet"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    log = tmp_path / "driver.log"
    driver = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=log.open("w"))
    results = out / "results.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and driver.poll() is None:
        if results.exists() and len(results.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    assert driver.poll() is None, f"the run ended before it could be killed:\n{log.read_text()[-3000:]}"
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    before, _ = read_results(results)
    assert 2 <= len(before) < 10

    resumed = label_on_ray(MODEL, folder, "<OD>", out, workers=2, batch_size=1, progress=False, **FAST)
    assert resumed.skipped == len(before) and resumed.processed == 10 - len(before)
    records, unreadable = read_results(results)
    files = [r["file"] for r in lines_that_parse(results)]
    assert sorted(files) == sorted(records) == [f"scene_{i:03d}.png" for i in range(10)]  # each exactly once
    assert unreadable == 0 and all("<OD>" in r["results"] for r in records.values())
    assert all(records[name] == record for name, record in before.items())  # earlier lines untouched


def lines_that_parse(path: Path) -> list[dict]:
    parsed = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            parsed.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return parsed


def _kill_one_worker() -> int | None:
    """SIGKILL one of Ray Data's map actors (process title ``ray::MapWorker(...)``); its pid, or None if none."""
    import psutil

    for process in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if cmdline.startswith("ray::MapWorker"):
            process.kill()
            return process.info["pid"]
    return None


@pytest.mark.slow
def test_a_worker_killed_mid_chunk_loses_nothing(cluster, tmp_path) -> None:
    folder = scene_folder(tmp_path / "scenes", 8)
    out = tmp_path / "out"
    outcome: dict = {}

    def run() -> None:
        outcome["summary"] = label_on_ray(MODEL, folder, "<OD>", out, workers=2, batch_size=1, progress=False, **FAST)

    thread = threading.Thread(target=run)
    thread.start()
    results = out / "results.jsonl"
    killed = None
    deadline = time.monotonic() + 240
    while killed is None and time.monotonic() < deadline and thread.is_alive():
        if results.exists() and results.read_text().count("\n") >= 1:  # both actors are up and answering
            killed = _kill_one_worker()
        time.sleep(0.05)
    thread.join(timeout=300)
    assert killed is not None, "no worker was killed: the test proved nothing"
    assert not thread.is_alive() and "summary" in outcome
    facts = json.loads((out / "summary.json").read_text())
    if facts["images_missing"]:  # Ray gave up on that chunk: the next run answers it
        label_on_ray(MODEL, folder, "<OD>", out, workers=2, batch_size=1, progress=False, **FAST)
    records, unreadable = read_results(results)
    assert sorted(records) == [f"scene_{i:03d}.png" for i in range(8)] and unreadable == 0
    assert len(lines(results)) == 8  # no image answered twice
    assert all("error" not in r for r in records.values())


@pytest.mark.slow
def test_a_uri_source_is_read_by_the_actors_themselves(cluster, tmp_path) -> None:
    """A ``file://`` URI goes through pyarrow's filesystem layer (the code path of s3:// and gs://) on each actor,
    and gives the answers the one-process engine gives for the same URI."""
    from helpers.course.checkpoints import load_model

    folder = scene_folder(tmp_path / "scenes", 3)
    uri = folder.as_uri() + "/*.png"
    model, processor = load_model(MODEL, "fp16", "CPU")
    process_images(model, processor, uri, "<OD>", tmp_path / "local", batch_size=2, progress=False, **FAST)
    label_on_ray(MODEL, uri, "<OD>", tmp_path / "ray", workers=2, batch_size=2, progress=False, **FAST)
    expected, _ = read_results(tmp_path / "local" / "results.jsonl")
    records, _ = read_results(tmp_path / "ray" / "results.jsonl")
    assert sorted(records) == sorted(expected) == [f"scene_{i:03d}.png" for i in range(3)]
    for name, record in records.items():
        assert record["sha256"] == expected[name]["sha256"]
        assert record["results"]["<OD>"]["bboxes"] == expected[name]["results"]["<OD>"]["bboxes"]
    assert json.loads((tmp_path / "ray" / "request.json").read_text())["images"] == folder.as_uri()


def test_engine_options_take_values_and_are_checked(tmp_path) -> None:
    from helpers.cli.batch import main, wants_batch

    folder = scene_folder(tmp_path / "scenes", 1)
    assert wants_batch(["--engine", "ray", "--workers", "2", "--ray-address", "auto", str(folder)])
    assert not wants_batch(["--ray-address", str(folder), str(folder / "scene_000.png")])
    with pytest.raises(ValueError, match="workers must be a positive integer"):
        label_on_ray(MODEL, folder, "<OD>", tmp_path / "out", workers=0)
    assert main([str(folder), "--engine", "ray", "--workers", "0", "--output-dir", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o" / "results.jsonl").exists()
