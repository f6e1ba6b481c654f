"""The converted-folder contract shared by build time and run time (imports nothing of ours; copy it with runtime/).

A converted Florence-2 folder holds one OpenVINO IR per part (:data:`IR_PARTS`), the processor and configs, and a
``manifest.json`` listing every file's size and hash with the layout and graph versions. :mod:`helpers.convert`
writes it (:func:`write_manifest`); :mod:`helpers.runtime` and the model cache read and check it
(:func:`verify_conversion`). A folder without a matching, intact manifest is never taken as converted.

Taught in ``notebooks/02_convert.ipynb``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

MANIFEST_NAME = "manifest.json"
#: Bump when the IR layout changes; folders written with another layout version are reconverted.
LAYOUT_VERSION = 1
#: Bump when the converter writes faster graphs with the same inputs, outputs and answers. Older folders still load;
#: :func:`helpers.course.checkpoints.ensure_converted` reconverts them when it can. 2: DaViT layout rewrite, transposed
#: cross-attention keys (``benchmarks/README.md``).
GRAPH_VERSION = 2
WEIGHT_FORMATS = ("fp32", "fp16", "int8", "int4", "w8a8")  # w8a8: helpers.convert.activation_quantization
IR_PARTS = ("vision_encoder", "encoder", "decoder")
#: Names of the decoder's OpenVINO state variables (``past_self.{layer}.key`` …) start with these.
SELF_STATE_PREFIX = "past_self"
CROSS_STATE_PREFIX = "past_cross"


class ConversionError(RuntimeError):
    """A conversion could not start or finish; the message says what to do."""


class IncompleteConversionError(ConversionError):
    """An existing output folder is not a complete, intact conversion."""


#: File names of PyTorch checkpoints: single files, shards and shard indexes (safetensors and pickle).
PYTORCH_WEIGHT_PATTERNS = ("*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin",
                           "pytorch_model.bin.index.json")  # fmt: skip


def pytorch_weight_files(folder: str | Path) -> list[str]:
    """Names of the PyTorch weight files in ``folder`` (empty when it holds none)."""
    folder = Path(folder)
    return sorted({path.name for pattern in PYTORCH_WEIGHT_PATTERNS for path in folder.glob(pattern)})


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in chunks (the manifest's and the model cache's content hash)."""
    with Path(path).open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def write_manifest(folder: Path, source: str, weight_format: str, versions: dict[str, str]) -> dict:
    """Write ``manifest.json`` over every file in ``folder``: sizes, hashes, layout/graph version, library versions."""
    files = {
        path.name: {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
        for path in sorted(folder.iterdir())
        if path.is_file() and path.name != MANIFEST_NAME
    }
    manifest = {
        "layout_version": LAYOUT_VERSION,
        "graph_version": GRAPH_VERSION,
        "source": source,
        "weight_format": weight_format,
        "versions": versions,
        "files": files,
    }
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
    _remember_verified(folder, sorted(files))  # just hashed: the first load need not hash again
    return manifest


def reconvert_hint(folder: str | Path, manifest: dict | None = None) -> str:
    """The command that repairs a damaged conversion folder: converting its source again over it."""
    source = (manifest or {}).get("source") or "MODEL"
    weight_format = (manifest or {}).get("weight_format") or "fp16"
    return f"Convert again with `convert_florence2({source!r}, {str(folder)!r}, {weight_format!r}, overwrite=True)`."


def read_manifest(folder: str | Path, *, fix: str | None = None) -> dict:
    """The manifest of a conversion folder; ``IncompleteConversionError`` (ending with ``fix``, default
    :func:`reconvert_hint`) when it is missing or corrupt."""
    path = Path(folder) / MANIFEST_NAME
    fix = fix or reconvert_hint(folder)
    if not path.exists():
        raise IncompleteConversionError(
            f"{folder} has no {MANIFEST_NAME}: it is not a finished conversion (it may have been interrupted). {fix}"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise IncompleteConversionError(f"{path} is corrupt ({error}). {fix}") from error
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(
        isinstance(entry, dict) and isinstance(entry.get("bytes"), int) and isinstance(entry.get("sha256"), str)
        for entry in files.values()
    ):
        raise IncompleteConversionError(f"{path} is not a manifest written by convert_florence2 (corrupt). {fix}")
    return manifest


#: Written into a conversion folder once its files matched the manifest's hashes: each file's size and change time
#: then, so later loads skip hashing until a file changes (see :func:`verify_conversion` with ``check_hashes="once"``).
VERIFIED_STAMP = ".verified.json"


def _file_stamps(folder: Path, names: list[str]) -> dict[str, list[int]]:
    stamps = {}
    for name in [*names, MANIFEST_NAME]:
        info = (folder / name).stat()
        stamps[name] = [info.st_size, info.st_mtime_ns, info.st_ino]
    return stamps


def _verified_before(folder: Path, names: list[str]) -> bool:
    try:
        return json.loads((folder / VERIFIED_STAMP).read_text(encoding="utf-8")) == _file_stamps(folder, names)
    except (OSError, ValueError):
        return False


def _remember_verified(folder: Path, names: list[str]) -> None:
    partial = folder / f"{VERIFIED_STAMP}.{os.getpid()}"
    try:
        partial.write_text(json.dumps(_file_stamps(folder, names)), encoding="utf-8")
        partial.replace(folder / VERIFIED_STAMP)
    except OSError:  # a read-only folder (a shared kit): hashes are checked at every load instead
        with contextlib.suppress(OSError):
            partial.unlink()


def verify_conversion(folder: str | Path, *, check_hashes: bool | str = True, fix: str | None = None) -> dict:
    """Check that ``folder`` is a complete conversion in this layout version; return its manifest.

    Sizes are always compared; hashes too when ``check_hashes`` is True, or with ``"once"`` when a file changed since
    the last successful check (``.verified.json`` remembers each file's size and change time: loading stays fast,
    yet a flipped byte or a file replaced by a same-size one is caught). ``fix`` ends every error message (default:
    the :func:`convert_florence2` command that repairs the folder).
    """
    folder = Path(folder)
    manifest = read_manifest(folder, fix=fix)
    fix = fix or reconvert_hint(folder, manifest)
    if manifest.get("layout_version") != LAYOUT_VERSION:
        raise IncompleteConversionError(
            f"{folder} was converted with IR layout version {manifest.get('layout_version')}, this code reads "
            f"version {LAYOUT_VERSION}. {fix}"
        )
    required = [f"{part}.{ext}" for part in IR_PARTS for ext in ("xml", "bin")] + ["config.json"]
    unlisted = [name for name in required if name not in manifest["files"]]
    if unlisted:
        raise IncompleteConversionError(f"{folder / MANIFEST_NAME} does not list {', '.join(unlisted)}. {fix}")
    for name, expected in manifest["files"].items():
        path = folder / name
        if not path.exists():
            raise IncompleteConversionError(f"{path} is missing. {fix}")
        if path.stat().st_size != expected["bytes"]:
            raise IncompleteConversionError(
                f"{path} has {path.stat().st_size} bytes, the manifest says {expected['bytes']}: it is truncated "
                f"or was changed. {fix}"
            )
    names = sorted(manifest["files"])
    if check_hashes == "once" and _verified_before(folder, names):
        return manifest
    if check_hashes:
        for name in names:
            if file_sha256(folder / name) != manifest["files"][name]["sha256"]:
                raise IncompleteConversionError(
                    f"{folder / name} does not match its recorded hash (corrupt or changed file). {fix}"
                )
        if check_hashes == "once":
            _remember_verified(folder, names)
    return manifest


def graph_version(output_dir: str | Path) -> int:
    """The :data:`GRAPH_VERSION` a folder was converted with (1 for folders written before it was recorded)."""
    return int(read_manifest(output_dir).get("graph_version", 1))


def is_converted(output_dir: str | Path, source: str | None = None, weight_format: str | None = None) -> bool:
    """True when ``output_dir`` holds a complete conversion (matching ``source``/``weight_format`` if given)."""
    try:
        manifest = verify_conversion(output_dir, check_hashes=False)
    except IncompleteConversionError:
        return False
    if weight_format is not None and manifest.get("weight_format") != weight_format:
        return False
    return source is None or manifest.get("source") == source


def ir_size_bytes(folder: str | Path) -> int:
    """Bytes of the IR weights and graphs in a converted folder (what the weight format changes)."""
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.suffix in (".bin", ".xml"))
