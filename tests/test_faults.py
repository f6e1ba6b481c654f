"""Killed runs lose and duplicate nothing and leave nothing behind (issue 17): tiny-model builds, batch runs,
conversions and kit builds killed with SIGKILL at random points, then run again."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_a_killed_model_build_leaves_no_folder_forever(tmp_path: Path) -> None:
    from helpers.course.tiny import make_tiny_florence2

    left = tmp_path / f".tiny-florence2.partial-{dead_pid()}-abc123"
    left.mkdir()
    (left / "model.safetensors").write_bytes(b"half written")
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as running:
        busy = tmp_path / f".tiny-florence2.partial-{running.pid}-def456"  # a build still in progress elsewhere
        busy.mkdir()
        make_tiny_florence2(tmp_path / "tiny-florence2")
        running.kill()
    assert not left.exists() and busy.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([busy.name, "tiny-florence2"])


# ---- kill -9 at random points: conversion, batch, kit building --------------------------------------------------

import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import time  # noqa: E402

import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from helpers.ir import is_converted, verify_conversion  # noqa: E402

KILLS = 5
#: Runs a conversion or a kit build in which tracing is replaced by reading already converted parts (everything
#: else, from loading the checkpoint to the manifest and the renames, is real), so that one run takes seconds.
PREBUILT_RUNNER = """
import sys
from pathlib import Path
import openvino as ov
from helpers.convert import conversion
prebuilt, mode, *args = sys.argv[1:]
for function, part in [("convert_vision_encoder", "vision_encoder"), ("convert_text_encoder", "encoder"),
                       ("convert_decoder", "decoder")]:
    setattr(conversion, function, lambda *a, _part=part, **k: ov.Core().read_model(Path(prebuilt) / f"{_part}.xml"))
if mode == "convert":
    conversion.convert_florence2(args[0], args[1], "fp32", verbose=False)
else:
    from helpers.course.kit import main
    main(["build", args[0], "--model", args[1], "--weight-format", "fp32", "--no-samples"])
"""


@pytest.fixture(scope="module")
def reference() -> tuple[Path, Path]:
    """(tiny source checkpoint, its fp32 conversion) from the shared test cache."""
    from helpers.course.checkpoints import TINY_MODEL, ensure_converted, resolve_model

    source = Path(resolve_model(TINY_MODEL))
    return source, ensure_converted(str(source), "fp32")


def run_and_kill(command: list[str], seconds: float | None) -> bool:
    """Run ``command``; with ``seconds``, SIGKILL it then (True if it was killed, False if it had finished)."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if seconds is None:
        _, error = process.communicate(timeout=300)
        assert process.returncode == 0, error.decode()[-2000:]
        return False
    try:
        process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
        process.wait()
        return True
    finally:
        process.stderr.close()
    return False


@pytest.mark.slow
def test_kill_9_at_random_points_loses_and_duplicates_nothing(reference, tmp_path) -> None:
    source, converted = reference
    rng = random.Random(17)
    runner = tmp_path / "runner.py"
    runner.write_text(PREBUILT_RUNNER)
    prebuilt = [sys.executable, str(runner), str(converted)]
    killed = {"conversion": 0, "batch": 0, "kit": 0}

    def each(name: str, command: list[str], reset, check, complete) -> None:
        start = time.perf_counter()
        run_and_kill(command, None)  # a complete run: how long one takes
        duration = time.perf_counter() - start
        check(final=True)
        reset()
        for _ in range(KILLS):
            killed[name] += run_and_kill(command, rng.uniform(0.15, 0.95) * duration)
            check(final=False)
            if complete():
                reset()  # finished before the kill: start over, so that the next kill lands mid-work again
        run_and_kill(command, None)  # the rerun after the last kill finishes the work
        check(final=True)

    # Conversion: the output is absent or complete and intact, never half; the rerun leaves no partial folders.
    output = tmp_path / "converted" / "fp32"

    def check_conversion(final: bool) -> None:
        if final or output.exists():
            verify_conversion(output, check_hashes=True)
        if final:
            assert [p.name for p in output.parent.iterdir()] == ["fp32"]

    each("conversion", [*prebuilt, "convert", str(source), str(output)],
         lambda: shutil.rmtree(output.parent), check_conversion, lambda: is_converted(output))  # fmt: skip

    # Batch: every line whole JSON, each image answered once over all the interrupted runs.
    images = tmp_path / "images"
    images.mkdir()
    for index in range(6):
        Image.new("RGB", (40 + 7 * index, 30), (40 * index, 90, 200)).save(images / f"{index}.png")
    out = tmp_path / "batch"

    def check_batch(final: bool) -> None:
        lines = (out / "results.jsonl").read_bytes().splitlines() if (out / "results.jsonl").exists() else []
        whole = [json.loads(line) for line in lines[:-1]]  # the last line may be torn by the kill
        names = [record["file"] for record in whole]
        assert len(names) == len(set(names)), names  # nothing answered twice
        if final:
            records = [json.loads(line) for line in lines]
            assert sorted(r["file"] for r in records) == [f"{i}.png" for i in range(6)]
            assert all("error" not in r and "<OD>" in r["results"] for r in records)

    batch = [sys.executable, "-m", "helpers", str(images), "--task", "<OD>", "--model", str(source), "--device", "CPU",
             "--weight-format", "fp32", "--max-new-tokens", "12", "--num-beams", "1", "--batch-size", "1",
             "--output-dir", str(out), "--quiet"]  # fmt: skip

    def batch_complete() -> bool:
        lines = (out / "results.jsonl").read_bytes().splitlines() if (out / "results.jsonl").exists() else []
        return len(lines) == 6

    each("batch", batch, lambda: shutil.rmtree(out, ignore_errors=True), check_batch, batch_complete)

    # Kit building: kit.json only once the kit is complete; its models verify; one conversion, no partial folders.
    kit = tmp_path / "kit"

    def check_kit(final: bool) -> None:
        if final or (kit / "kit.json").exists():
            entries = json.loads((kit / "kit.json").read_text())["models"]
            assert len(entries) == 1 and is_converted(kit / entries[0]["path"])
            verify_conversion(kit / entries[0]["path"], check_hashes=True)
        if final:
            folders = [p for p in (kit / "models").rglob("*") if p.is_dir() and p.name.startswith(".")]
            assert folders == [], folders

    each("kit", [*prebuilt, "kit", str(kit), str(source)], lambda: shutil.rmtree(kit), check_kit,
         lambda: (kit / "kit.json").exists())  # fmt: skip
    assert all(count >= 3 for count in killed.values()), killed  # most runs were really killed mid-way


def test_mixed_calls_keep_memory_and_disk_flat(reference) -> None:
    """A short `python scripts/soak.py --mixed` (threads + scores + batch runs; the full 300 calls are reported in
    the issue 17 report): memory and disk flat after the warm-up."""
    _, converted = reference
    script = Path(__file__).resolve().parent.parent / "scripts" / "soak.py"
    command = [sys.executable, str(script), "--model-dir", str(converted), "--mixed", "--iterations", "60",
               "--warmup", "24", "--json"]  # fmt: skip
    # One malloc arena per thread (glibc) grows RSS by ~17% over 300 such calls and then stops (at most 8 per core);
    # two arenas keep the figure about leaks: +1.7% RSS over 300 calls (scripts/soak.py docstring).
    env = {**os.environ, "MALLOC_ARENA_MAX": "2"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["rss_growth_percent"] < 5 and figures["peak_rss_growth_percent"] < 5, figures
    assert figures["final_disk_bytes"] <= figures["baseline_disk_bytes"] + 4096, figures  # a JSON line's jitter
