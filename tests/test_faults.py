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
    from helpers.tiny import make_tiny_florence2

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
