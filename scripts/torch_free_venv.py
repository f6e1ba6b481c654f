"""Build (once) and find the torch-free deployment environment: ``requirements-inference.txt`` plus ``helpers``.

    python scripts/torch_free_venv.py        # builds it if needed, prints its Python interpreter

It is cached under ``build/torch-free-venv/<key>/``, keyed by a hash of ``requirements-inference.txt`` and the
Python version, so a changed requirements file gets a fresh environment. ``tests/test_torch_free.py`` checks that
its answers equal the full environment's; ``benchmarks/benchmark.py`` measures OpenVINO's memory in it (a deployment
does not import torch). The README's "Deploy without torch" section shows the same two pip commands.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS = ROOT / "requirements-inference.txt"


def venv_python(venv: Path) -> Path:
    """The interpreter inside ``venv``."""
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def torch_free_venv_dir() -> Path:
    """Where the environment for the current ``requirements-inference.txt`` and Python lives (built or not)."""
    key = hashlib.sha256(REQUIREMENTS.read_bytes() + sys.version.encode()).hexdigest()[:12]
    return ROOT / "build" / "torch-free-venv" / key


def build_torch_free_venv() -> Path:
    """The cached environment, built on first use (one builder at a time; a half-built one is rebuilt)."""
    venv = torch_free_venv_dir()
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (venv / ".ready").exists():
            return venv
        shutil.rmtree(venv, ignore_errors=True)  # a half-built venv from an interrupted run
        started = time.monotonic()
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(venv_python(venv)), "-m", "pip", "install", "--quiet"]
        subprocess.run([*pip, "-r", str(REQUIREMENTS)], check=True)
        subprocess.run([*pip, "--no-deps", "-e", str(ROOT)], check=True)
        (venv / ".ready").write_text(f"built in {time.monotonic() - started:.0f} s\n")
    return venv


if __name__ == "__main__":
    print(venv_python(build_torch_free_venv()))
