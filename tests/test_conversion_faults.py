"""Conversion faults: a killed conversion is never taken as complete, reruns convert cleanly, damaged outputs are
detected with a message saying how to reconvert, and an unwritable or full output location is refused before any
long work starts.

Killing happens for real (SIGKILL, in a subprocess) at chosen points of the conversion. Tracing the tiny model costs
tens of seconds and is not what these tests are about, so in most of them the subprocess reuses the IR parts of one
earlier conversion (``ov.read_model`` instead of tracing) and everything else — staging folder, ``ov.save_model``,
processor files, manifest, renames — is the real code. One test kills a real, unpatched conversion at a random
moment.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import helpers.convert.conversion as conversion
from helpers import ir
from helpers.convert.conversion import (
    convert_florence2,
)
from helpers.ir import (
    ConversionError,
    IncompleteConversionError,
    is_converted,
    read_manifest,
    verify_conversion,
)

pytestmark = pytest.mark.skipif(os.name != "posix", reason="SIGKILL and the stale-folder cleanup are POSIX-only")

RECONVERT = "overwrite=True"  # every "damaged output" message must say how to reconvert

#: Runs convert_florence2 and SIGKILLs itself at KILL_AT. argv: source output prebuilt kill_at overwrite(0/1).
#: prebuilt "-" runs the real, unpatched conversion.
WRAPPER = r"""
import os, signal, sys
from pathlib import Path

import openvino as ov

import helpers.convert.conversion as conv

source, output, prebuilt, kill_at, overwrite = sys.argv[1:6]
output = Path(output)


def die():
    print(f"KILLED at {kill_at}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


if prebuilt != "-":
    def reuse(part):
        def build(*args, **kwargs):
            if kill_at == "vision" and part == "vision_encoder":
                die()  # the vision encoder is the first part converted
            return ov.Core().read_model(Path(prebuilt) / f"{part}.xml")
        return build

    conv.convert_vision_encoder = reuse("vision_encoder")
    conv.convert_text_encoder = reuse("encoder")
    conv.convert_decoder = reuse("decoder")

real_save_model = ov.save_model


def save_model(model, path, *args, **kwargs):
    real_save_model(model, path, *args, **kwargs)
    if kill_at == "decoder_bin" and Path(path).name == "decoder.xml":
        weights = Path(path).with_suffix(".bin")
        with weights.open("r+b") as handle:  # what the disk holds when the process dies mid-write
            handle.truncate(weights.stat().st_size // 2)
        die()


ov.save_model = save_model
real_write_manifest = conv.write_manifest


def write_manifest(folder, *args, **kwargs):
    if kill_at == "manifest":
        (Path(folder) / conv.MANIFEST_NAME).write_text('{"layout_version": 1, "files": {"decoder.bin": {"by')
        die()
    return real_write_manifest(folder, *args, **kwargs)


conv.write_manifest = write_manifest
import helpers.folders as folders

real_replace_folder = folders.replace_folder


def replace_folder(staging, output_dir):
    if kill_at == "before_rename":
        die()
    return real_replace_folder(staging, output_dir)


folders.replace_folder = replace_folder
real_rename = Path.rename


def rename(self, target):
    into_place = Path(target) == output
    if kill_at == "between_renames" and into_place:
        die()  # the old output was moved aside, the new one is not in place yet
    result = real_rename(self, target)
    if kill_at == "after_rename" and into_place:
        die()  # in place; the old output (if any) is not deleted yet
    return result


Path.rename = rename
conv.convert_florence2(source, output, "fp32", overwrite=overwrite == "1", verbose=False)
print("FINISHED", flush=True)
"""


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(tiny source checkpoint, its complete fp32 conversion), built once and cached under FLORENCE2_MODELS_DIR."""
    from helpers.course.checkpoints import TINY_MODEL, ensure_converted, resolve_model

    source = Path(resolve_model(TINY_MODEL))
    converted = ensure_converted(str(source), "fp32")
    verify_conversion(converted)
    return source, converted


@pytest.fixture(scope="module")
def wrapper(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("wrapper") / "kill_conversion.py"
    path.write_text(WRAPPER)
    return path


@pytest.fixture
def reuse_prebuilt(monkeypatch: pytest.MonkeyPatch, reference: tuple[Path, Path]) -> None:
    """In-process conversions read the reference IR parts instead of tracing (everything else is real)."""
    import openvino as ov

    for function, part in [
        ("convert_vision_encoder", "vision_encoder"),
        ("convert_text_encoder", "encoder"),
        ("convert_decoder", "decoder"),
    ]:
        monkeypatch.setattr(
            conversion, function, lambda *a, _part=part, **k: ov.Core().read_model(reference[1] / f"{_part}.xml")
        )


def run_wrapper(wrapper: Path, source: Path, output: Path, prebuilt: Path | str, kill_at: str, overwrite: bool):
    command = [
        sys.executable,
        str(wrapper),
        str(source),
        str(output),
        str(prebuilt),
        kill_at,
        "1" if overwrite else "0",
    ]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )


def leftovers(output: Path) -> list[Path]:
    return sorted(p for p in output.parent.iterdir() if p.name.startswith(f".{output.name}."))


def copy_conversion(converted: Path, target: Path) -> Path:
    shutil.copytree(converted, target, ignore=shutil.ignore_patterns("compiled_cache"))
    return target


def ir_hashes(folder: Path) -> dict[str, str]:
    files = read_manifest(folder)["files"]
    return {name: entry["sha256"] for name, entry in files.items() if name.endswith((".xml", ".bin"))}


def assert_refused_clearly(output: Path) -> None:
    """Not taken as complete by is_converted, verify_conversion or OVFlorence2Model, each saying what to do."""
    from helpers.runtime.ov_model import OVFlorence2Model

    assert not is_converted(output)
    with pytest.raises((FileNotFoundError, IncompleteConversionError)) as caught:
        OVFlorence2Model(output, "CPU", cache_dir=None)
    assert "onvert" in str(caught.value), caught.value  # "Convert a model first" / "Convert again …"


# ------------------------------------------------------------------------------------------------ killed conversions

#: kill point, convert over an existing complete output?, what the output folder must be afterwards
KILL_POINTS = [
    ("vision", False, "absent"),
    ("decoder_bin", False, "absent"),
    ("manifest", False, "absent"),
    ("before_rename", False, "absent"),
    ("decoder_bin", True, "previous"),  # an interrupted overwrite keeps the previous conversion usable
    ("between_renames", True, "absent"),
    ("after_rename", False, "new"),  # in place already: complete and intact
]


@pytest.mark.parametrize(("kill_at", "over_existing", "expected"), KILL_POINTS)
def test_killed_conversion_is_never_taken_as_complete_and_rerun_converts_cleanly(
    kill_at, over_existing, expected, tmp_path, wrapper, reference, reuse_prebuilt
):
    source, converted = reference
    output = (tmp_path / "out").resolve()
    if over_existing:
        copy_conversion(converted, output)
        manifest = json.loads((output / "manifest.json").read_text())
        manifest["source"] = "an earlier model"  # so that the previous output is told apart from the new one
        (output / "manifest.json").write_text(json.dumps(manifest))

    result = run_wrapper(wrapper, source, output, converted, kill_at, over_existing)
    assert result.returncode == -signal.SIGKILL, f"not killed at {kill_at}: {result.stdout}\n{result.stderr[-2000:]}"
    assert f"KILLED at {kill_at}" in result.stdout

    if expected == "absent":
        assert not output.exists()
        assert_refused_clearly(output)
    elif expected == "previous":
        assert verify_conversion(output)["source"] == "an earlier model"
        assert not is_converted(output, str(source), "fp32")
    else:  # "new"
        assert verify_conversion(output)["source"] == str(source)
        assert is_converted(output, str(source), "fp32")
    if expected != "new":
        assert leftovers(output), "the kill should have left a staging folder behind (else nothing was tested)"

    # A rerun converts cleanly: a complete, intact output, the same IR as an undisturbed conversion, no leftovers.
    rerun = convert_florence2(source, output, "fp32", overwrite=over_existing, verbose=False)
    assert rerun == output
    assert verify_conversion(output, check_hashes=True)["source"] == str(source)
    assert ir_hashes(output) == ir_hashes(converted)
    assert leftovers(output) == [], "folders left by the killed conversion were not cleaned up"


def test_a_real_conversion_killed_at_a_random_moment(tmp_path, wrapper, reference, reuse_prebuilt):
    """The unpatched conversion, SIGKILLed from outside at a random moment after its staging folder appears
    (loading the model or tracing the vision encoder: the later points are covered one by one above)."""
    source, converted = reference
    output = (tmp_path / "out").resolve()
    delay = random.uniform(0.0, 3.0)
    command = [sys.executable, str(wrapper), str(source), str(output), "-", "none", "0"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    killed_at = None
    try:
        while process.poll() is None and time.monotonic() < deadline:
            if killed_at is None and leftovers(output):
                killed_at = time.monotonic() + delay
            if killed_at is not None and time.monotonic() >= killed_at:
                os.kill(process.pid, signal.SIGKILL)
                break
            time.sleep(0.01)
    finally:
        if process.poll() is None and time.monotonic() >= deadline:
            process.kill()
        stdout, stderr = process.communicate()
    if process.returncode == 0:  # finished within the delay (a very fast machine): then it must be complete
        assert verify_conversion(output) and is_converted(output, str(source), "fp32")
        return
    assert process.returncode == -signal.SIGKILL, f"killed {delay:.2f} s in: {stderr[-2000:]}"
    assert_refused_clearly(output)
    assert leftovers(output)
    rerun = convert_florence2(source, output, "fp32", verbose=False)
    assert verify_conversion(rerun, check_hashes=True) and ir_hashes(rerun) == ir_hashes(converted)
    assert leftovers(output) == []


def test_staging_folder_of_a_live_conversion_is_left_alone(tmp_path, reference, reuse_prebuilt):
    source, _ = reference
    output = (tmp_path / "out").resolve()
    live = output.parent / f".{output.name}.partial-{os.getppid()}-abc"  # our parent process is alive
    dead = output.parent / f".{output.name}.old-{_dead_pid()}"
    other = output.parent / f".{output.name}-notes"
    for folder in (live, dead, other):
        folder.mkdir()
    convert_florence2(source, output, "fp32", verbose=False)
    assert live.exists() and other.exists() and not dead.exists()


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


# ------------------------------------------------------------------------------------------------ damaged outputs


def test_truncated_ir_file_is_detected_and_refused(tmp_path, reference):
    from helpers.runtime.ov_model import OVFlorence2Model

    source, converted = reference
    output = copy_conversion(converted, tmp_path / "out")
    weights = output / "decoder.bin"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    for check in (lambda: verify_conversion(output), lambda: verify_conversion(output, check_hashes=False)):
        with pytest.raises(IncompleteConversionError, match=rf"decoder\.bin has \d+ bytes.*truncated.*{RECONVERT}"):
            check()
    assert not is_converted(output)
    with pytest.raises(IncompleteConversionError, match=f"truncated.*{RECONVERT}"):
        OVFlorence2Model(output, "CPU", cache_dir=None)
    with pytest.raises(IncompleteConversionError, match="Pass overwrite=True"):
        convert_florence2(source, output, "fp32", verbose=False)  # never silently reused


def test_corrupted_ir_file_of_the_same_size_fails_the_hash_check(tmp_path, reference):
    _, converted = reference
    output = copy_conversion(converted, tmp_path / "out")
    data = bytearray((output / "vision_encoder.bin").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (output / "vision_encoder.bin").write_bytes(bytes(data))
    with pytest.raises(
        IncompleteConversionError, match=f"vision_encoder.bin does not match its recorded hash.*{RECONVERT}"
    ):
        verify_conversion(output)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda out: (out / "encoder.xml").unlink(), "encoder.xml is missing"),
        (lambda out: (out / "manifest.json").unlink(), "no manifest.json: it is not a finished conversion"),
        (lambda out: (out / "manifest.json").write_text("{not json"), "manifest.json is corrupt"),
        (lambda out: (out / "manifest.json").write_text("[]"), "not a manifest written by convert_florence2"),
        (lambda out: (out / "manifest.json").write_text('{"layout_version": 1}'), "not a manifest written by"),
        (lambda out: _edit_manifest(out, files={}), "does not list vision_encoder.xml"),
        (lambda out: _edit_manifest(out, layout_version=0), "IR layout version 0, this code reads version 1"),
    ],
    ids=["missing-file", "no-manifest", "manifest-not-json", "manifest-list", "manifest-no-files",
         "manifest-empty-files", "old-layout"],
)  # fmt: skip
def test_damaged_output_is_refused_with_how_to_reconvert(tmp_path, reference, damage, message):
    from helpers.runtime.ov_model import OVFlorence2Model

    _, converted = reference
    output = copy_conversion(converted, tmp_path / "out")
    damage(output)
    with pytest.raises(IncompleteConversionError, match=message) as caught:
        verify_conversion(output)
    assert RECONVERT in str(caught.value)
    assert not is_converted(output)
    with pytest.raises(IncompleteConversionError, match=message):
        OVFlorence2Model(output, "CPU", cache_dir=None)


def _edit_manifest(output: Path, **changes) -> None:
    manifest = json.loads((output / "manifest.json").read_text())
    manifest.update(changes)
    (output / "manifest.json").write_text(json.dumps(manifest))


# ------------------------------------------------------------------------------------------------ refused up front


@pytest.fixture
def no_conversion_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail loudly if convert_florence2 gets as far as loading the model."""

    def started(*args, **kwargs):
        raise AssertionError("conversion work started before the output location was checked")

    monkeypatch.setattr(conversion, "load_torch_model", started)
    monkeypatch.setattr(conversion, "_convert_into", started)


def _refused_quickly(source: Path, output: Path, message: str, **kwargs) -> None:
    start = time.perf_counter()
    with pytest.raises(ConversionError, match=message):
        convert_florence2(source, output, "fp32", verbose=False, **kwargs)
    assert time.perf_counter() - start < 5


def test_full_disk_is_refused_before_any_work(tmp_path, reference, monkeypatch, no_conversion_work):
    source, _ = reference
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1_000_000))
    _refused_quickly(
        source, tmp_path / "out", r"Only 0\.00 GB free at .*needs about .*Free some space or choose another"
    )
    assert not (tmp_path / "out").exists() and leftovers(tmp_path / "out") == []


def test_read_only_location_is_refused_before_any_work(tmp_path, reference, monkeypatch, no_conversion_work):
    source, _ = reference
    read_only = (tmp_path / "read-only").resolve()
    read_only.mkdir()
    real_access = os.access
    # Tests run as root here, and root may write anywhere: make only this folder report itself read-only.
    monkeypatch.setattr(
        os, "access", lambda path, mode, *a, **k: False if Path(path) == read_only and mode & os.W_OK else real_access(path, mode, *a, **k)
    )  # fmt: skip
    _refused_quickly(source, read_only / "out", "is not writable. Choose an output folder you can write to")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores file permissions")
def test_read_only_folder_by_permissions_is_refused(tmp_path, reference, no_conversion_work):
    source, _ = reference
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    read_only.chmod(0o555)
    try:
        _refused_quickly(source, read_only / "out", "not writable. Choose an output folder you can write to")
    finally:
        read_only.chmod(0o755)


def test_output_under_a_file_or_being_a_file_is_refused(tmp_path, reference, no_conversion_work):
    source, _ = reference
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a folder")
    _refused_quickly(source, a_file / "out", "Cannot create .*notes.txt.*Choose an output folder you can write to")
    _refused_quickly(source, a_file, "is a file, not a folder. Choose a folder path")
    assert a_file.read_text() == "not a folder"


def test_overwrite_never_deletes_the_source_or_unrelated_files(tmp_path, reference, no_conversion_work):
    source, _ = reference
    checkpoint = shutil.copytree(source, tmp_path / "checkpoint")
    before = sorted(p.name for p in checkpoint.iterdir())
    _refused_quickly(checkpoint, checkpoint, "holds the checkpoint being converted.*Choose another output folder",
                     overwrite=True)  # fmt: skip
    _refused_quickly(checkpoint, tmp_path, "holds the checkpoint being converted", overwrite=True)
    assert sorted(p.name for p in checkpoint.iterdir()) == before

    documents = tmp_path / "documents"
    documents.mkdir()
    (documents / "thesis.docx").write_text("years of work")
    _refused_quickly(checkpoint, documents, r"not from a conversion \(thesis.docx\).*Choose a new or empty output",
                     overwrite=True)  # fmt: skip
    assert (documents / "thesis.docx").read_text() == "years of work"


def test_overwrite_replaces_an_earlier_conversion(tmp_path, reference, reuse_prebuilt):
    source, converted = reference
    output = copy_conversion(converted, tmp_path / "out")
    (output / "compiled_cache").mkdir()
    _edit_manifest(output, layout_version=0)
    convert_florence2(source, output, "fp32", overwrite=True, verbose=False)
    assert verify_conversion(output)["layout_version"] == ir.LAYOUT_VERSION
    assert leftovers(output) == []


def test_converted_model_still_answers_after_a_rerun(tmp_path, reference, reuse_prebuilt):
    """The IR a rerun writes is not only byte-identical on paper: it loads and generates like the original."""
    from transformers import AutoProcessor

    from helpers.runtime.ov_model import EXACT_CONFIG, OVFlorence2Model

    source, converted = reference
    output = convert_florence2(source, tmp_path / "out", "fp32", verbose=False)
    processor = AutoProcessor.from_pretrained(output)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    inputs = processor(text="<OD>", images=image, return_tensors="pt")
    answers = [
        OVFlorence2Model(folder, "CPU", EXACT_CONFIG, cache_dir=None).generate(**inputs, max_new_tokens=12, num_beams=1)
        for folder in (converted, output)
    ]
    assert answers[0].tolist() == answers[1].tolist()


# ------------------------------------------------------------------------------------------------ older converters


def _older_conversion(reference: tuple[Path, Path], source: Path, models_dir: Path) -> Path:
    """A complete conversion of ``source`` as an older converter left it: no ``graph_version`` in its manifest."""
    from helpers.course.checkpoints import converted_dir

    folder = converted_dir(str(source), "fp32")
    shutil.copytree(reference[1], folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["graph_version"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert ir.graph_version(folder) == 1
    return folder


def test_an_older_conversion_is_converted_again_when_the_source_is_there(reference, tmp_path, monkeypatch, capsys):
    from helpers.course.checkpoints import ensure_converted

    monkeypatch.setenv("FLORENCE2_MODELS_DIR", str(tmp_path / "models"))
    folder = _older_conversion(reference, reference[0], tmp_path / "models")
    assert ensure_converted(str(reference[0]), "fp32") == folder
    assert ir.graph_version(folder) == ir.GRAPH_VERSION
    verify_conversion(folder)
    assert "converted by an older version" in capsys.readouterr().out


def test_an_older_conversion_is_kept_when_the_source_is_gone(reference, tmp_path, monkeypatch, capsys):
    from helpers.course.checkpoints import ensure_converted

    monkeypatch.setenv("FLORENCE2_MODELS_DIR", str(tmp_path / "models"))
    source = tmp_path / "deleted-source"
    folder = _older_conversion(reference, source, tmp_path / "models")
    assert ensure_converted(str(source), "fp32") == folder
    assert ir.graph_version(folder) == 1  # untouched, still loads
    verify_conversion(folder)
    assert "Using the older conversion" in capsys.readouterr().out
