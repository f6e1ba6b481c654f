"""The model cache (helpers.course.checkpoints): keyed on weight content, verified on load, damaged folders refused with the
one command that repairs them (issue 17)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from helpers import ir
from helpers.ir import IncompleteConversionError, read_manifest

REPAIR = r"load_model\(.*reconvert=True\).*--reconvert"


@pytest.fixture(scope="module")
def reference() -> tuple[Path, Path]:
    """(tiny source checkpoint, its fp32 conversion), built once in the shared test cache."""
    from helpers.course.checkpoints import TINY_MODEL, ensure_converted, resolve_model

    source = Path(resolve_model(TINY_MODEL))
    return source, ensure_converted(str(source), "fp32")


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reference) -> tuple[Path, Path]:
    """A private models cache holding a copy of the tiny source and of its conversion: ``(source, converted)``."""
    from helpers.course.checkpoints import converted_dir

    monkeypatch.setenv("FLORENCE2_MODELS_DIR", str(tmp_path / "models"))
    source = tmp_path / "my-model"
    shutil.copytree(reference[0], source)
    target = converted_dir(str(source), "fp32")
    shutil.copytree(reference[1], target, ignore=shutil.ignore_patterns("compiled_cache", ".verified.json"))
    return source, target


def flip_bytes(path: Path, offset_fraction: float = 0.5, count: int = 8) -> None:
    data = bytearray(path.read_bytes())
    start = int(len(data) * offset_fraction)
    data[start : start + count] = bytes(255 - b for b in data[start : start + count])
    path.write_bytes(bytes(data))


def rewrite_manifest_hash(folder: Path, name: str) -> None:
    """Make the manifest agree with a damaged file, as if it had been converted that way."""
    manifest = read_manifest(folder)
    manifest["files"][name]["sha256"] = ir.file_sha256(folder / name)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_a_model_retrained_into_the_same_folder_gets_a_new_conversion(cache) -> None:
    from helpers.course.checkpoints import converted_dir

    source, converted = cache
    assert converted_dir(str(source), "fp32") == converted
    flip_bytes(source / "model.safetensors")  # new weights, same size and same JSON files: a retrained model
    assert converted_dir(str(source), "fp32") != converted


def test_loading_checks_hashes_once_and_refuses_a_corrupt_folder(cache, monkeypatch) -> None:
    from helpers.course.checkpoints import load_model

    source, converted = cache
    hashed: list[str] = []
    real_sha = ir.file_sha256
    monkeypatch.setattr(ir, "file_sha256", lambda path: hashed.append(Path(path).name) or real_sha(path))
    load_model(str(source), "fp32", "CPU", cache_dir=None)
    assert "decoder.bin" in hashed  # verified the first time
    hashed.clear()
    load_model(str(source), "fp32", "CPU", cache_dir=None)
    assert hashed == []  # remembered: later loads stay fast

    flip_bytes(converted / "decoder.bin")  # 8 flipped bytes: plausible wrong answers if loaded
    with pytest.raises(IncompleteConversionError, match=rf"decoder\.bin does not match its recorded hash.*{REPAIR}"):
        load_model(str(source), "fp32", "CPU", cache_dir=None)


@pytest.mark.parametrize("name", ["encoder.xml", "tokenizer.json"])
def test_same_size_garbage_gives_a_clear_error(cache, name) -> None:
    from helpers.course.checkpoints import load_model

    source, converted = cache
    path = converted / name
    path.write_bytes(b"\xff" * path.stat().st_size)
    with pytest.raises(IncompleteConversionError, match=rf"{name} does not match its recorded hash.*{REPAIR}"):
        load_model(str(source), "fp32", "CPU", cache_dir=None)
    # Even when the manifest agrees (a converter bug, an edited manifest): a clear error, not a raw
    # RuntimeError or UnicodeDecodeError.
    rewrite_manifest_hash(converted, name)
    with pytest.raises(IncompleteConversionError, match=rf"OpenVINO cannot read .*{name}.*overwrite=True|"
                                                      rf"processor files .* cannot be read.*{REPAIR}") as caught:  # fmt: skip
        load_model(str(source), "fp32", "CPU", cache_dir=None)
    print(caught.value)


@pytest.mark.slow  # converts the tiny model once (~1 min on 2 busy cores)
def test_the_named_repair_exists_and_repairs(cache, tmp_path, capsys) -> None:
    from helpers.cli.main import main

    source, converted = cache
    flip_bytes(converted / "vision_encoder.bin")
    image = tmp_path / "x.png"
    Image.new("RGB", (32, 32), "blue").save(image)
    command = [str(image), "--task", "<OD>", "--model", str(source), "--weight-format", "fp32", "--device", "CPU",
               "--max-new-tokens", "4", "--num-beams", "1"]  # fmt: skip
    assert main(command) == 2
    error = capsys.readouterr().err
    assert "vision_encoder.bin does not match" in error and "--reconvert" in error
    assert main([*command, "--reconvert"]) == 0
    assert main(command) == 0


def blobs(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.blob"))


def test_compiled_cache_stays_bounded(cache) -> None:
    from helpers.runtime.ov_model import OVFlorence2Model

    _, converted = cache
    stale = converted / "compiled_cache" / "1234.blob"  # what older versions left: one flat, unbounded folder
    stale.parent.mkdir()
    stale.write_bytes(b"old")
    OVFlorence2Model(converted, "CPU")
    first = blobs(converted / "compiled_cache")
    assert stale not in first and len(first) == 4  # one blob per part
    for _ in range(2):
        OVFlorence2Model(converted, "CPU")
    assert blobs(converted / "compiled_cache") == first  # loading again reuses them (each load added one before)
    # A blob written now (another OpenVINO version, device or setting: here the old one is gone) prunes the part's
    # folder to the newest KEEP_COMPILED_BLOBS.
    decoder = converted / "compiled_cache" / "decoder"
    for blob in blobs(decoder):
        blob.unlink()
    for age, name in enumerate(["a", "b", "c"]):
        (decoder / f"{name}.blob").write_bytes(b"other settings")
        os.utime(decoder / f"{name}.blob", (1_000_000 + age, 1_000_000 + age))
    OVFlorence2Model(converted, "CPU")
    kept = blobs(decoder)
    assert len(kept) == 2 and decoder / "c.blob" in kept and (decoder / "a.blob") not in kept


def test_compiled_cache_place_is_configurable(cache, tmp_path, monkeypatch) -> None:
    from helpers.runtime.ov_model import OVFlorence2Model

    _, converted = cache
    monkeypatch.setenv("FLORENCE2_COMPILED_CACHE", str(tmp_path / "ov-cache"))
    model = OVFlorence2Model(converted, "CPU")
    assert model.compiled_cache.parent == tmp_path / "ov-cache" and len(blobs(tmp_path / "ov-cache")) == 4
    assert not (converted / "compiled_cache").exists()
    monkeypatch.setenv("FLORENCE2_COMPILED_CACHE", "off")
    assert OVFlorence2Model(converted, "CPU").compiled_cache is None
    explicit = OVFlorence2Model(converted, "CPU", cache_dir=tmp_path / "mine")  # the argument wins
    assert explicit.compiled_cache == tmp_path / "mine" and len(blobs(tmp_path / "mine")) == 4


def test_a_failing_compiled_cache_never_stops_a_model_from_loading(cache, tmp_path, monkeypatch) -> None:
    """Processes sharing a cache folder can make OpenVINO fail on a blob another one wrote or pruned (seen with two
    Ray actors compiling the teaching model at once: "cannot set permissions: No such file or directory [….blob]").
    The cache only saves time, so the part compiles again without it. OpenVINO is made to fail exactly that way
    whenever a CACHE_DIR is given; the model must still load and answer."""
    import openvino as ov

    from helpers.runtime import ov_model

    class RacingCore(ov.Core):
        def compile_model(self, model, device_name=None, config=None):
            if config and "CACHE_DIR" in config:
                raise RuntimeError("filesystem error: cannot set permissions: No such file or directory [x.blob]")
            return super().compile_model(model, device_name, config)

    monkeypatch.setattr(ov_model.ov, "Core", RacingCore)
    _, converted = cache
    model = ov_model.OVFlorence2Model(converted, "CPU", cache_dir=tmp_path / "shared-cache")
    assert model.compiled_cache == tmp_path / "shared-cache"
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(converted, trust_remote_code=False)
    pixels = processor.image_processor(images=Image.new("RGB", (64, 64)), return_tensors="np")["pixel_values"]
    assert model.image_features(pixels).shape[0] == 1


def test_loading_a_complete_conversion_deletes_what_killed_conversions_left(cache) -> None:
    import subprocess
    import sys

    from helpers.course.checkpoints import ensure_converted

    source, converted = cache
    pid = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                             text=True).stdout)  # fmt: skip
    left = converted.parent / f".{converted.name}.partial-{pid}-x1y2"
    left.mkdir()
    (left / "decoder.bin").write_bytes(b"half")
    assert ensure_converted(str(source), "fp32") == converted
    assert not left.exists()
