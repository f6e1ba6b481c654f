"""Images that live behind a URI: ``s3://``, ``gs://``, ``hdfs://``, ``abfs://``, ``file://`` (pyarrow's filesystems)
and any scheme an installed fsspec package adds (``memory://``, ``gcs://`` with gcsfs, ``http://`` …).

    python -m helpers s3://my-bucket/photos/ --task "<OD>" --output-dir out/ --engine ray --workers 8
    python -m helpers "gs://my-bucket/photos/**/*.jpg" --task "<OD>" --output-dir out/

The batch command lists a URI folder or glob here, hashes and reads each image through the same filesystem, and
keys its records on the path relative to the folder, exactly as for a local folder; so a dataset in a bucket labels,
resumes and exports like one on disk, on one machine or on every actor of a Ray cluster (each actor opens the URI
itself: credentials come from the usual places — environment variables, instance roles, config files).
Taught in ``notebooks/13_label_dataset.ipynb``.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import re
from collections.abc import Collection, Sequence
from typing import Any

__all__ = ["GLOB_CHARS", "glob_match", "is_uri", "list_uri_images", "read_uri_bytes", "uri_sha256", "open_uri_image"]

_SCHEME = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://")
#: Characters that make a path a glob pattern (local paths and URIs alike).
GLOB_CHARS = ("*", "?", "[")


def is_uri(text: Any) -> bool:
    """Whether ``text`` is a ``scheme://…`` address (Windows drive paths such as ``C:\\photos`` are not)."""
    return isinstance(text, str) and bool(_SCHEME.match(text))


def _split(uri: str) -> tuple[str, str, str]:
    """``(scheme://, path part, ?query)`` of a URI."""
    prefix = _SCHEME.match(uri).group(0)  # type: ignore[union-attr]
    rest, _, query = uri[len(prefix) :].partition("?")
    return prefix, rest, f"?{query}" if query else ""


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]


def _filesystem(uri: str) -> tuple[Any, str]:
    """``(pyarrow FileSystem, path inside it)`` for ``uri``: pyarrow's own filesystem for its schemes, else the
    fsspec one wrapped for pyarrow. Raises ``ValueError`` naming the scheme and what to install or configure."""
    import pyarrow.fs as pafs

    scheme = _SCHEME.match(uri).group("scheme")  # type: ignore[union-attr]
    try:
        return pafs.FileSystem.from_uri(uri)
    except Exception as arrow_error:  # pyarrow raises ArrowInvalid, OSError … by scheme
        if "Unrecognized filesystem type" not in str(arrow_error):
            raise ValueError(f"Cannot open {uri}: {_first_line(arrow_error)}. Check the address and this machine's "
                             f"credentials or client libraries for {scheme}://.") from arrow_error  # fmt: skip
    try:
        import fsspec

        filesystem, path = fsspec.core.url_to_fs(uri)
    except Exception as fsspec_error:  # fsspec raises ValueError/ImportError for unknown schemes
        raise ValueError(
            f"No filesystem for {scheme}:// ({_first_line(fsspec_error)}). pyarrow opens s3://, gs://, hdfs://, "
            f"abfs:// and file://; for other schemes install the fsspec package that provides {scheme}://."
        ) from fsspec_error
    return pafs.PyFileSystem(pafs.FSSpecHandler(filesystem)), path


def glob_match(pattern: Sequence[str], parts: Sequence[str]) -> bool:
    """Whether relative path ``parts`` match glob ``pattern`` parts as :func:`glob.glob` would (``**`` is any number
    of folders; names starting with ``.`` match only a pattern part that starts with ``.``). Local globs and URI
    globs both match with it."""
    if not pattern:
        return not parts
    head = pattern[0]
    if head == "**":
        return any(
            glob_match(pattern[1:], parts[skip:]) for skip in range(len(parts) + 1)
            if not any(part.startswith(".") for part in parts[:skip])
        )  # fmt: skip
    if not parts or (parts[0].startswith(".") and not head.startswith(".")):
        return False
    return fnmatch.fnmatchcase(parts[0], head) and glob_match(pattern[1:], parts[1:])


def list_uri_images(uri: str, suffixes: Collection[str], *, recursive: bool = False) -> tuple[str, list[str]]:
    """``(root URI, sorted image URIs)`` for a URI folder (files ending in one of ``suffixes``; ``recursive``
    descends), a URI glob (every file it matches; ``**`` works) or one image file. Raises ``ValueError`` when the
    address cannot be opened or holds no image."""
    import pyarrow.fs as pafs

    prefix, rest, query = _split(uri)
    parts = rest.rstrip("/").split("/")
    glob_at = next((i for i, part in enumerate(parts) if any(c in part for c in GLOB_CHARS)), None)
    fixed = "/".join(parts if glob_at is None else parts[:glob_at])
    filesystem, base = _filesystem(prefix + fixed + query)
    try:
        info = filesystem.get_file_info(base)
        if glob_at is None and info.type == pafs.FileType.File:
            parent = base.rsplit("/", 1)[0]
            return prefix + parent + query, [prefix + base + query]
        if info.type != pafs.FileType.Directory:
            raise ValueError(f"{prefix + fixed} is not a folder or an image file (nothing found there).")
        deep = recursive or (glob_at is not None and len(parts) - glob_at > 1)
        found = filesystem.get_file_info(pafs.FileSelector(base, recursive=deep))
    except ValueError:
        raise
    except Exception as error:  # permissions, network, missing bucket …
        raise ValueError(f"Cannot list {uri}: {_first_line(error)}.") from error
    files = [entry.path for entry in found if entry.type == pafs.FileType.File]
    relative = {path: path[len(base) :].lstrip("/") for path in files}
    if glob_at is None:
        chosen = [path for path in files if "." + path.rsplit(".", 1)[-1].lower() in suffixes]
        if not chosen:
            raise ValueError(f"No images in {uri} (looked for {', '.join(sorted(suffixes))}"
                             f"{'' if recursive else ', not in sub-folders: add --recursive'}).")  # fmt: skip
    else:
        chosen = [path for path in files if glob_match(parts[glob_at:], relative[path].split("/"))]
        if not chosen:
            raise ValueError(f"The pattern {uri!r} matches no files.")
    root = prefix + base.rstrip("/") + query
    return root, sorted(prefix + path + query for path in chosen)


def read_uri_bytes(uri: str) -> bytes:
    """The bytes of the file at ``uri``."""
    filesystem, path = _filesystem(uri)
    with filesystem.open_input_stream(path) as stream:
        return stream.read()


def uri_sha256(uri: str) -> str:
    """The SHA-256 of the file at ``uri``, read in 1 MiB pieces (the batch command's image identity)."""
    filesystem, path = _filesystem(uri)
    digest = hashlib.sha256()
    with filesystem.open_input_stream(path) as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def open_uri_image(uri: str) -> tuple[Any, str]:
    """``(PIL image, SHA-256 of the bytes it was decoded from)``: one read serves both, so a record's hash always
    belongs to the pixels that were answered. Raises ``ValueError`` for bytes Pillow cannot decode."""
    from PIL import Image, UnidentifiedImageError

    data = read_uri_bytes(uri)
    if not data:
        raise ValueError(f"{uri} is empty (0 bytes); re-upload the image.")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"{uri} is not an image Pillow can read ({_first_line(error)}); re-export it as "
                         "PNG or JPEG.") from error  # fmt: skip
    return image, hashlib.sha256(data).hexdigest()
