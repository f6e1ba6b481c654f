"""Folders that are complete or absent: build in a staging folder beside the target, rename it into place at the end.

A conversion, a tiny model build or a kit copy can be killed at any moment; a folder half-written must never be
taken as finished. :func:`staged_folder` writes into ``.NAME.partial-PID-*`` beside the target and renames it into
place only when the work succeeded; an old target is moved aside first (``.NAME.old-PID``) and deleted last.
:func:`remove_stale_staging` deletes what killed runs left, once their process is gone. Imports nothing of ours.
Used by :mod:`helpers.convert.conversion` (02_convert) and :mod:`helpers.course.tiny` (00_setup).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def staged_folder(output_dir: Path) -> Iterator[Path]:
    """A new empty folder beside ``output_dir``; when the block ends without an error it replaces ``output_dir``
    (:func:`replace_folder`), otherwise it is deleted and ``output_dir`` is left as it was."""
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    # The pid in the name lets a later run tell a folder left by a killed run from one still being written.
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.partial-{os.getpid()}-", dir=output_dir.parent))
    make_shareable(staging)  # mkdtemp makes 0700 folders; a shared kit or cache must be readable
    try:
        yield staging
        replace_folder(staging, output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def make_shareable(folder: Path) -> None:
    """Give a temporary folder the permissions a normal ``mkdir`` would (honouring the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (POSIX); what tells a killed run's leftovers from a running one's."""
    try:
        os.kill(pid, 0)  # signal 0: existence check only (POSIX)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_staging(output_dir: Path) -> None:
    """Delete folders that killed conversions or model builds left beside ``output_dir`` (``.name.partial-PID-*``,
    ``.name.old-PID``) once their process is gone, so interrupted runs do not pile up gigabytes."""
    if os.name != "posix":  # os.kill(pid, 0) would terminate the process on Windows
        return
    pattern = re.compile(rf"\.{re.escape(output_dir.name)}\.(?:partial|old)-(\d+)(?:-.*)?")
    for entry in output_dir.parent.iterdir():
        match = pattern.fullmatch(entry.name)
        if match and entry.is_dir() and int(match.group(1)) != os.getpid() and not pid_alive(int(match.group(1))):
            shutil.rmtree(entry, ignore_errors=True)


def replace_folder(staging: Path, output_dir: Path) -> None:
    """Rename the finished folder into place; an old output is moved aside first and deleted last."""
    if output_dir.exists():
        old = output_dir.with_name(f".{output_dir.name}.old-{os.getpid()}")
        output_dir.rename(old)
        staging.rename(output_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(output_dir)
