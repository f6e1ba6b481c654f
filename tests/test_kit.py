"""A classroom kit built from the Hugging Face cache, copied to a fresh folder, serves the notebooks' model with no
conversion, no network and an empty Hugging Face cache."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.course.kit import read_kit


def test_read_kit_names_the_fix_for_a_plain_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="python -m helpers.course.kit build"):
        read_kit(tmp_path)


HUB_ID = "florence-community/Florence-2-base-ft"
RUNNER = Path(__file__).resolve().parent.parent / "scripts" / "run_collection.py"


def file_in_hf_cache(folder: Path, hub_cache: Path, repo_id: str) -> Path:
    """Put ``folder`` into ``hub_cache`` the way ``hf download repo_id`` leaves it (huggingface_hub's cache layout:
    blobs named by content hash, a snapshot of symlinks for one commit, ``refs/main`` naming that commit)."""
    import hashlib

    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for item in folder.iterdir():
        blob = repo / "blobs" / hashlib.sha256(item.read_bytes()).hexdigest()
        shutil.copyfile(item, blob)
        (snapshot / item.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def machine_env(hf_home: Path, **extra: str) -> dict[str, str]:
    """This process's environment with its own Hugging Face cache and no model, kit or cache choices."""
    dropped = ("FLORENCE2_MODELS_DIR", "FLORENCE2_MODEL", "FLORENCE2_KIT", "HF_HUB_OFFLINE", "HF_HUB_CACHE")
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    env.update(HF_HOME=str(hf_home), HF_HUB_CACHE=str(hf_home / "hub"), **extra)
    return env


def test_teacher_builds_from_the_hf_cache_and_an_offline_laptop_runs_the_kit(tmp_path: Path) -> None:
    """The README's classroom path, end to end, on a tiny model filed under the real hub id."""
    from helpers.course.tiny import make_tiny_florence2

    # The teacher: `hf download` once, then build the kit with the hub unreachable (a dead endpoint, not
    # HF_HUB_OFFLINE, so huggingface_hub has to notice the failure and fall back to its cache).
    teacher_hf = tmp_path / "teacher-hf"
    file_in_hf_cache(make_tiny_florence2(tmp_path / "tiny"), teacher_hf / "hub", HUB_ID)
    teacher = machine_env(teacher_hf, HF_ENDPOINT="http://127.0.0.1:9", FLORENCE2_MODELS_DIR=str(tmp_path / "t-models"))
    kit = tmp_path / "kit"
    build = [sys.executable, "-m", "helpers.course.kit", "build", str(kit), "--model", HUB_ID]
    done = subprocess.run(build, env=teacher, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert [(e["model"], e["weight_format"]) for e in read_kit(kit)["models"]] == [(HUB_ID, "fp16")]
    assert "TEACHING" not in done.stdout + done.stderr, "the kit build fell back to another model"
    assert not (tmp_path / "t-models").exists(), "the kit build converted outside the kit"
    assert (kit / "images" / "shapes.png").exists()

    # A laptop: the kit copied over, no network, an EMPTY Hugging Face cache, an empty conversion cache (set, as
    # runners and users do: the kit must still come first). A lesson asks for int8; the kit holds fp16.
    laptop_kit = tmp_path / "usb" / "classroom-kit"
    shutil.copytree(kit, laptop_kit, symlinks=False)
    shutil.rmtree(kit)  # nothing may still point at the teacher's copy
    before = sorted(p.relative_to(laptop_kit) for p in laptop_kit.rglob("*") if "compiled_cache" not in p.parts)
    laptop_hf = tmp_path / "laptop-hf"
    (laptop_hf / "hub").mkdir(parents=True)
    laptop = machine_env(
        laptop_hf, HF_HUB_OFFLINE="1", FLORENCE2_KIT=str(laptop_kit), FLORENCE2_MODEL=HUB_ID,
        FLORENCE2_MODELS_DIR=str(tmp_path / "l-models"),
    )  # fmt: skip
    script = (
        "import importlib.util, sys\n"
        "from helpers.course.checkpoints import load_model, model_from_env\n"
        "from helpers.course.model_kind import model_kind\n"
        "from helpers.course.samples import load_sample\n"
        "from helpers.tasks.run import run_task\n"
        f"spec = importlib.util.spec_from_file_location('runner', {str(RUNNER)!r})\n"
        "runner = importlib.util.module_from_spec(spec); spec.loader.exec_module(runner)\n"
        "print('RUNNER CHOSE', runner.choose_model())\n"  # what `make run` passes to every kernel
        "model, processor = load_model(model_from_env(), 'int8', 'CPU')\n"  # what a lesson's first cell does
        "print('DIR', model.model_dir)\n"
        "print('KIND', model_kind(model))\n"
        "print(run_task(model, processor, load_sample('shapes'), '<OD>', max_new_tokens=8))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], env=laptop, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert f"RUNNER CHOSE {HUB_ID}" in done.stdout, done.stdout
    assert f"DIR {laptop_kit / 'models'}" in done.stdout, "the model was not loaded from the kit"
    assert "KIND random" in done.stdout, "another model (not the tiny one filed as the hub id) was loaded"
    assert "holds florence-community/Florence-2-base-ft as fp16, not int8: using its fp16" in done.stderr
    assert "<OD>" in done.stdout
    assert not (tmp_path / "l-models").exists() and not any((laptop_hf / "hub").iterdir()), "it converted or downloaded"
    after = sorted(p.relative_to(laptop_kit) for p in laptop_kit.rglob("*") if "compiled_cache" not in p.parts)
    assert after == before, "using the kit wrote new files into it (other than the compiled-model cache)"


def test_without_the_kit_the_runner_says_the_model_cannot_be_had(tmp_path: Path) -> None:
    """Asked for a hub model it cannot get, the runner never reports it as the model that runs."""
    empty_hf = tmp_path / "hf"
    (empty_hf / "hub").mkdir(parents=True)
    env = machine_env(empty_hf, HF_HUB_OFFLINE="1", FLORENCE2_MODEL=HUB_ID, FLORENCE2_MODELS_DIR=str(tmp_path / "m"))
    script = (
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('runner', {str(RUNNER)!r})\n"
        "runner = importlib.util.module_from_spec(spec); spec.loader.exec_module(runner)\n"
        "print('RUNNER CHOSE', runner.choose_model())\n"
    )
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"{HUB_ID} cannot be loaded" in done.stdout
    assert "RUNNER CHOSE teaching" in done.stdout, done.stdout

    env["FLORENCE2_MODEL"] = "florence-community/Florence-2-large"
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "RUNNER CHOSE" not in done.stdout
    assert "Florence-2-large (FLORENCE2_MODEL) cannot be loaded" in done.stderr
