"""Batch sources behind a URI (helpers.cli.image_sources): a dataset in a bucket labels like a folder on disk.

No bucket is reachable here, so the tests use the two URI filesystems that need no server: fsspec's in-process
``memory://`` (read through pyarrow's fsspec bridge, like gcsfs or adlfs would be) and ``file://`` (pyarrow's own,
the code path of s3://, gs:// and hdfs://)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import fsspec
import numpy as np
import pytest
from PIL import Image

from helpers.cli.batch import find_images, process_images, read_results, wants_batch
from helpers.cli.image_sources import is_uri, list_uri_images

FAST = {"max_new_tokens": 12, "num_beams": 1}
NAMES = ["a.png", "b.jpg", "deeper/c.png"]
SIZES = [(64, 48), (40, 72), (96, 32)]


def pictures() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    files = {}
    for name, (w, h) in zip(NAMES, SIZES):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buffer, format=Path(name).suffix[1:]
                                                                               .replace("jpg", "jpeg"))  # fmt: skip
        files[name] = buffer.getvalue()
    files["broken.png"] = b"\x89PNG\r\n\x1a\n and then no image at all"
    files["notes.txt"] = b"not an image"
    return files


@pytest.fixture
def local_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    for name, data in pictures().items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return folder


@pytest.fixture
def memory_folder(request) -> str:
    filesystem = fsspec.filesystem("memory")
    root = f"/florence2-test-{request.node.name}"
    for name, data in pictures().items():
        filesystem.pipe(f"{root}/{name}", data)
    yield f"memory://{root}"
    filesystem.rm(root, recursive=True)


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_uris_are_told_from_paths() -> None:
    assert is_uri("s3://bucket/photos/") and is_uri("file:///tmp/x") and is_uri("memory://x")
    assert not is_uri("photos/") and not is_uri(r"C:\photos") and not is_uri(Path("s3:/x"))
    # The command line takes a URI as a batch source, as it takes a folder.
    assert wants_batch(["s3://bucket/photos/", "--task", "<OD>", "--output-dir", "out"])
    assert wants_batch(["--task", "<OD>", "gs://bucket/**/*.jpg"])


def test_listing_a_uri_folder_and_glob_matches_the_local_listing(local_folder, memory_folder) -> None:
    root, files = list_uri_images(memory_folder, {".png", ".jpg"}, recursive=True)
    assert root == memory_folder
    assert [f[len(root) + 1 :] for f in files] == sorted(["a.png", "b.jpg", "broken.png", "deeper/c.png"])
    _, shallow = find_images(memory_folder)
    assert [f.rsplit("/", 1)[-1] for f in shallow] == ["a.png", "b.jpg", "broken.png"]
    _, globbed = find_images(memory_folder + "/**/*.png")
    local_root, local_glob = find_images(str(local_folder) + "/**/*.png")
    assert [f[len(memory_folder) + 1 :] for f in globbed] == [p.relative_to(local_root).as_posix() for p in local_glob]
    # file:// goes through pyarrow's own filesystem (the s3:// / gs:// code path).
    uri_root, uri_files = find_images(local_folder.as_uri(), recursive=True)
    assert uri_root == local_folder.as_uri() and len(uri_files) == 4
    _, one = find_images((local_folder / "a.png").as_uri())
    assert one == [(local_folder / "a.png").as_uri()]


def test_a_memory_uri_folder_gives_the_local_answers_and_resumes(local_folder, memory_folder, tmp_path,
                                                                 tiny_torch_model, tiny_processor) -> None:  # fmt: skip
    local = process_images(tiny_torch_model, tiny_processor, local_folder, ["<OD>", "<CAPTION>"], tmp_path / "local",
                           recursive=True, coco=True, progress=False, **FAST)  # fmt: skip
    remote = process_images(tiny_torch_model, tiny_processor, memory_folder, ["<OD>", "<CAPTION>"], tmp_path / "uri",
                            recursive=True, coco=True, progress=False, **FAST)  # fmt: skip
    assert (remote.processed, remote.failed) == (local.processed, local.failed) == (3, ["broken.png"])
    expected, _ = read_results(tmp_path / "local" / "results.jsonl")
    records = lines(tmp_path / "uri" / "results.jsonl")
    assert sorted(r["file"] for r in records) == sorted(expected)  # keys relative to the root, as for a folder
    for record in records:
        want = expected[record["file"]]
        for field in ("sha256", "width", "height", "results", "requests", "error_cause"):
            assert record.get(field) == want.get(field), (record["file"], field)
    assert "not an image Pillow can read" in {r["file"]: r for r in records}["broken.png"]["error"]
    local_coco, coco = (json.loads((tmp_path / e / "coco.json").read_text()) for e in ("local", "uri"))
    assert coco["images"] == local_coco["images"] and coco["annotations"] == local_coco["annotations"]
    request = json.loads((tmp_path / "uri" / "request.json").read_text())
    assert request["images"] == memory_folder  # the URI is what the folder's answers belong to

    # A rerun answers only what changed: here one image whose bytes changed in the bucket.
    changed = pictures()["a.png"][:-1] + b"\x00"  # still a PNG Pillow reads (the last byte is the IEND CRC)
    fsspec.filesystem("memory").pipe(memory_folder[len("memory://") :] + "/a.png", changed)
    again = process_images(tiny_torch_model, tiny_processor, memory_folder, ["<OD>", "<CAPTION>"], tmp_path / "uri",
                           recursive=True, progress=False, **FAST)  # fmt: skip
    assert (again.processed, again.skipped, again.changed) == (1, 2, ["a.png"])
    final, _ = read_results(tmp_path / "uri" / "results.jsonl")
    assert len(final) == 4 and final["a.png"]["sha256"] != expected["a.png"]["sha256"]


def test_bad_uris_say_what_is_wrong(tmp_path) -> None:
    with pytest.raises(ValueError, match="nosuchscheme://"):
        find_images("nosuchscheme://bucket/photos/")
    with pytest.raises(ValueError, match="not a folder or an image file"):
        find_images((tmp_path / "missing").as_uri())
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="No images in"):
        find_images((tmp_path / "empty").as_uri())
    with pytest.raises(ValueError, match="matches no files"):
        find_images((tmp_path / "empty").as_uri() + "/*.jpg")


def test_a_record_hashes_the_bytes_it_answered(memory_folder, tmp_path, tiny_torch_model, tiny_processor) -> None:
    """An image replaced in the bucket between planning and answering is recorded with the new bytes' hash, so the
    next run never takes an answer about the old picture for the new one."""
    import hashlib

    from helpers.cli.batch import BatchSummary, answer_chunk, make_request, plan_batch

    request = make_request(tiny_torch_model, ["<CAPTION>"], scores=False, **FAST)
    root, files = find_images(memory_folder)
    jobs = plan_batch(root, files, {}, request, BatchSummary())
    replacement = pictures()["b.jpg"]
    fsspec.filesystem("memory").pipe(memory_folder[len("memory://") :] + "/a.png", replacement)
    records = {r["file"]: r for r in answer_chunk(tiny_torch_model, tiny_processor, jobs, request)}
    assert records["a.png"]["sha256"] == hashlib.sha256(replacement).hexdigest()
    assert records["b.jpg"]["sha256"] == hashlib.sha256(replacement).hexdigest()
    assert (records["a.png"]["width"], records["a.png"]["height"]) == SIZES[1]
