"""A classroom kit built here, moved to a fresh folder, serves the notebooks' model with no conversion or network."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.kit import build_kit, read_kit


def test_kit_moves_and_loads_without_converting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLORENCE2_MODELS_DIR", raising=False)
    kit = build_kit(tmp_path / "built" / "kit", ["tiny"], ["fp16"])
    entries = read_kit(kit)["models"]
    assert [(e["model"], e["weight_format"]) for e in entries] == [("tiny", "fp16")]
    assert (kit / "images" / "shapes.png").exists()

    moved = tmp_path / "usb" / "classroom-kit"
    moved.parent.mkdir()
    shutil.move(str(kit), moved)
    before = sorted(p.relative_to(moved) for p in moved.rglob("*") if "compiled_cache" not in p.parts)
    script = (
        "from helpers.models import load_model\n"
        "from helpers.tasks import run_task\n"
        "from helpers.samples import load_sample\n"
        "model, processor = load_model('tiny', 'fp16', 'CPU')\n"
        "print(model.model_dir)\n"
        "print(run_task(model, processor, load_sample('shapes'), '<OD>', max_new_tokens=8))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("FLORENCE2_MODELS_DIR", "FLORENCE2_MODEL")}
    env.update(FLORENCE2_KIT=str(moved), HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Converting" not in done.stdout + done.stderr, "the moved kit was converted again"
    assert str(moved) in done.stdout and "<OD>" in done.stdout
    after = sorted(p.relative_to(moved) for p in moved.rglob("*") if "compiled_cache" not in p.parts)
    assert after == before, "using the kit wrote new files into it (other than the compiled-model cache)"


def test_read_kit_names_the_fix_for_a_plain_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="python -m helpers.kit build"):
        read_kit(tmp_path)
