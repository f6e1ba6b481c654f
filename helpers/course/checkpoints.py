"""Choose a Florence-2 checkpoint, convert it once, load it: the one-call path every notebook uses.

* :data:`CHECKPOINTS` — the four native Florence-2 checkpoints and what distinguishes them;
* :func:`model_from_env` / :func:`device_from_env` — the parameters cell of every notebook
  (``FLORENCE2_MODEL``, ``FLORENCE2_DEVICE``), so CI and offline classrooms can point all lessons at a local model;
* :func:`ensure_converted` — convert into a cache folder (``FLORENCE2_MODELS_DIR``) the first time only;
* :func:`load_model` — the converted model on a device, plus its processor.

What kind of model a lesson runs (real, teaching, random) is :mod:`helpers.course.model_kind`.

Taught in ``notebooks/01_select_model.ipynb``.
"""

from __future__ import annotations

import os
import re
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL = "florence-community/Florence-2-base-ft"
DEFAULT_DEVICE = "AUTO"
#: ``--model tiny`` / ``FLORENCE2_MODEL=tiny``: the offline random-weight model built by :mod:`helpers.course.tiny`.
TINY_MODEL = "tiny"
#: ``--model base-random``: the full Florence-2-base architecture with random weights (speed measurements offline).
BASE_RANDOM_MODEL = "base-random"
#: ``--model large-random``: the Florence-2-large architecture (0.77 B parameters) with random weights.
LARGE_RANDOM_MODEL = "large-random"
#: ``--model teaching`` / ``FLORENCE2_MODEL=teaching``: the small Florence-2 trained on generated shape scenes that
#: ships in ``helpers/data/teaching-model`` (see :mod:`helpers.course.teaching`); real answers offline, on such scenes.
TEACHING_MODEL = "teaching"
REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Checkpoint:
    hub_id: str
    parameters_millions: int
    fine_tuned: bool
    summary: str


CHECKPOINTS: dict[str, Checkpoint] = {
    c.hub_id: c
    for c in (
        Checkpoint(DEFAULT_MODEL, 231, True, "base, fine-tuned on downstream tasks: the best start"),
        Checkpoint("florence-community/Florence-2-base", 231, False, "base, pretrained only"),
        Checkpoint("florence-community/Florence-2-large-ft", 771, True, "large, fine-tuned: more accurate, ~3x slower"),
        Checkpoint("florence-community/Florence-2-large", 771, False, "large, pretrained only"),
    )
}


def model_from_env(default: str = DEFAULT_MODEL) -> str:
    """The model the notebooks use: ``FLORENCE2_MODEL`` if set (a hub id, a local folder or ``tiny``)."""
    return os.environ.get("FLORENCE2_MODEL", "").strip() or default


def device_from_env(default: str = DEFAULT_DEVICE) -> str:
    """The OpenVINO device the notebooks use: ``FLORENCE2_DEVICE`` if set."""
    return os.environ.get("FLORENCE2_DEVICE", "").strip() or default


def models_dir() -> Path:
    """Where conversions are written and cached: ``FLORENCE2_MODELS_DIR``, else ``<repository>/models``.

    A classroom kit (``FLORENCE2_KIT``) is read before this cache, never written to: see :func:`kit_from_env`."""
    if os.environ.get("FLORENCE2_MODELS_DIR"):
        return Path(os.environ["FLORENCE2_MODELS_DIR"]).expanduser().resolve()
    return (REPO_ROOT / "models").resolve()


def kit_from_env() -> Path | None:
    """The classroom kit the notebooks read converted models from: ``FLORENCE2_KIT`` (see :mod:`helpers.course.kit`)."""
    kit = os.environ.get("FLORENCE2_KIT", "").strip()
    return Path(kit).expanduser().resolve() if kit else None


def offline_mode() -> bool:
    """Whether ``HF_HUB_OFFLINE`` asks for no network (read now: a notebook may set it after importing helpers)."""
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in ("1", "true", "yes", "on")


def hub_reachable(timeout: float = 3.0) -> bool:
    """False when ``HF_HUB_OFFLINE`` is set or huggingface.co cannot be reached within ``timeout`` seconds."""
    if offline_mode():
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def in_hf_cache(model_id: str) -> bool:
    """True when ``model_id`` was downloaded before (``hf download``, ``from_pretrained``) into the Hugging Face cache
    (``HF_HUB_CACHE`` / ``HF_HOME``): it converts with no network then."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(model_id, "config.json"), str)
    except ValueError:  # not a valid repo id (huggingface_hub's HFValidationError is a ValueError)
        return False


def hub_model_unavailable(model: str, cache_dir: Path | None = None) -> str | None:
    """Why hub id ``model`` cannot be had here, or ``None`` when it can: it is a local folder or a named offline
    model, the classroom kit holds it, it was converted before, it is in the Hugging Face cache, or the hub answers."""
    if (
        model in (TINY_MODEL, BASE_RANDOM_MODEL, LARGE_RANDOM_MODEL, TEACHING_MODEL)
        or Path(model).expanduser().exists()
    ):
        return None
    from helpers.course.kit import find_in_kit

    kit = kit_from_env()
    if kit is not None and find_in_kit(kit, model) is not None:
        return None
    if any(((cache_dir or models_dir()) / _slug(model)).glob("*/manifest.json")) or in_hf_cache(model):
        return None
    if hub_reachable():
        return None
    hub = "the Hugging Face hub is unreachable" + (" (HF_HUB_OFFLINE is set)" if offline_mode() else "")
    where = f"the classroom kit {kit}" if kit is not None else "a classroom kit (FLORENCE2_KIT is not set)"
    return (
        f"{hub}, and it is not in {where}, not among the converted models in "
        f"{cache_dir or models_dir()} and not in the Hugging Face cache"
    )


#: In ``models_dir()``: the SHA-256 of each source weight file hashed so far, with the size, change time and inode it
#: had then, so a folder's content hash is computed once, not at every load (a 3 GB checkpoint takes ~5 s to hash).
CONTENT_HASHES_FILE = ".content-hashes.json"


def _file_digest(path: Path) -> str:
    """SHA-256 of a weight file, remembered in :data:`CONTENT_HASHES_FILE` while its size/mtime/inode are unchanged."""
    import json

    from helpers.ir import file_sha256

    info = path.stat()
    key, stamp = str(path.resolve()), [info.st_size, info.st_mtime_ns, info.st_ino]
    memo_path = models_dir() / CONTENT_HASHES_FILE
    try:
        memo = json.loads(memo_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        memo = {}
    entry = memo.get(key) if isinstance(memo, dict) else None
    if isinstance(entry, dict) and entry.get("stamp") == stamp:
        return entry["sha256"]
    digest = file_sha256(path)
    memo = memo if isinstance(memo, dict) else {}
    memo[key] = {"stamp": stamp, "sha256": digest}
    partial = memo_path.with_name(f"{CONTENT_HASHES_FILE}.{os.getpid()}")
    try:
        memo_path.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps(memo), encoding="utf-8")
        partial.replace(memo_path)
    except OSError:  # a read-only cache: hash again next time
        pass
    return digest


def _slug(model_id_or_path: str) -> str:
    """A folder name for a model: the hub name, or a local folder's name plus a short hash of its *content* (JSON
    files and weights), so a cache or classroom kit still matches after the folder is moved or copied, and a model
    retrained into the same folder gets a new conversion instead of the stale one."""
    path = Path(model_id_or_path).expanduser()
    if path.is_dir():
        import hashlib

        digest = hashlib.sha1()
        weights = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin"))  # .bin: original-layout folders
        for item in sorted(path.glob("*.json")) + weights:
            digest.update(item.name.encode())
            digest.update(item.read_bytes() if item.suffix == ".json" else _file_digest(item).encode())
        return f"{path.resolve().name}-{digest.hexdigest()[:8]}"
    return re.sub(r"[^A-Za-z0-9._-]+", "--", model_id_or_path)


def resolve_model(model: str, *, cache_dir: Path | None = None, fallback: bool = True) -> str:
    """Turn what a user typed into a hub id or an existing folder.

    ``tiny`` builds (once, in ``cache_dir``, default :func:`models_dir`) and returns the offline tiny model;
    ``teaching`` returns the shipped teaching model. When the default hub model is asked for but cannot be had (see
    :func:`hub_model_unavailable`), say so loudly and — if ``fallback`` — use the teaching model (trained here on
    generated shape scenes: real boxes and captions on such scenes), or the random-weight tiny model if the teaching
    model is missing, so an offline classroom still runs every lesson end to end. Without ``fallback`` (building a
    kit) the hub id is returned and the conversion then fails with a message that says how to get the checkpoint.
    """
    if model == TEACHING_MODEL:
        from helpers.course.teaching import TEACHING_MODEL_DIR, teaching_model_available

        if not teaching_model_available():
            raise FileNotFoundError(
                f"The teaching model is missing from {TEACHING_MODEL_DIR} (the package was installed without its "
                "data?). Reinstall with `pip install -e .`, or retrain it: python -m helpers.course.teaching.train "
                f"--output {TEACHING_MODEL_DIR} --steps 1000 --seed 0"
            )
        return str(TEACHING_MODEL_DIR)
    if model == TINY_MODEL:
        from helpers.course.tiny import make_tiny_florence2

        return str(make_tiny_florence2((cache_dir or models_dir()) / "tiny-florence2"))
    if model == BASE_RANDOM_MODEL:
        from helpers.course.tiny import make_random_florence2

        return str(make_random_florence2((cache_dir or models_dir()) / "base-random-florence2", "base"))
    if model == LARGE_RANDOM_MODEL:
        from helpers.course.tiny import make_random_florence2

        return str(make_random_florence2((cache_dir or models_dir()) / "large-random-florence2", "large"))
    if not fallback or model != DEFAULT_MODEL:
        return model
    reason = hub_model_unavailable(model, cache_dir)
    if reason is None:
        return model
    from helpers.course.teaching import teaching_model_available

    fix = (
        "    To use a real model offline, download it once (`hf download <hub id>`) or use a classroom kit\n"
        "    (FLORENCE2_KIT, see helpers/course/kit.py), or set FLORENCE2_MODEL to a downloaded Florence-2 folder."
    )
    if teaching_model_available():
        print(
            f"⚠️  {model} cannot be loaded: {reason}.\n"
            "    Using the offline TEACHING model instead (FLORENCE2_MODEL=teaching): a small Florence-2 trained in\n"
            "    this repository on generated scenes of coloured circles, squares and triangles with a word; on photos\n"
            f"    and other text its answers are meaningless.\n{fix}"
        )
        return resolve_model(TEACHING_MODEL)
    print(
        f"⚠️  {model} cannot be loaded: {reason}.\n"
        f"    Using the offline tiny model instead: it runs every step, but its answers are random.\n{fix}"
    )
    return resolve_model(TINY_MODEL, cache_dir=cache_dir)


def resolve_pytorch_model(model: str) -> str:
    """:func:`resolve_model` for a lesson that needs the PyTorch weights (benchmarking, fine-tuning): when ``model``'s
    checkpoint is not on this machine and cannot be downloaded — a classroom kit holds only its OpenVINO conversion —
    say so and use the teaching model instead. Taught in ``notebooks/11_speed.ipynb``."""
    source = resolve_model(model)
    if Path(source).expanduser().is_dir() or in_hf_cache(source) or hub_reachable():
        return source
    print(
        f"⚠️  The PyTorch checkpoint of {model} is not on this machine and the hub is unreachable (a classroom kit\n"
        "    holds only its OpenVINO conversion), but this lesson needs PyTorch. Using the offline TEACHING model\n"
        "    instead (FLORENCE2_MODEL=teaching). Download the checkpoint once (`hf download <hub id>`) to use yours."
    )
    return resolve_model(TEACHING_MODEL)


def converted_dir(model_id_or_path: str, weight_format: str, cache_dir: Path | None = None) -> Path:
    """The cache folder for one model in one weight format (under ``cache_dir``, default :func:`models_dir`)."""
    return (cache_dir or models_dir()) / _slug(model_id_or_path) / weight_format


def repair_hint(model_id_or_path: str, weight_format: str) -> str:
    """How a user repairs a damaged cached conversion: the one call (and its command-line form) that converts again."""
    return (
        f"Repair it with `load_model({model_id_or_path!r}, {weight_format!r}, reconvert=True)` (command line: add "
        "--reconvert)."
    )


def ensure_converted(
    model_id_or_path: str,
    weight_format: str = "fp16",
    *,
    reconvert: bool = False,
    cache_dir: Path | None = None,
    fallback: bool = True,
) -> Path:
    """Convert ``model_id_or_path`` into the cache the first time; later calls return the cached folder.

    With ``FLORENCE2_KIT`` set and no ``cache_dir`` given, a conversion the kit holds comes first — in the asked
    weight format, else in the one the kit has (saying so). ``cache_dir`` and ``fallback``: see
    :func:`resolve_model` (a kit build converts into its own folder and never falls back to another model).
    The cached folder is checked against its manifest (hashes the first time it is used and whenever a file
    changed); a damaged one is refused with the file named and the repair: ``reconvert=True`` converts again.
    """
    from helpers.convert.conversion import convert_florence2
    from helpers.folders import remove_stale_staging
    from helpers.ir import (
        GRAPH_VERSION,
        MANIFEST_NAME,
        IncompleteConversionError,
        verify_conversion,
    )

    kit = kit_from_env()
    if kit is not None and cache_dir is None and not reconvert:
        from helpers.course.kit import find_in_kit

        held = find_in_kit(kit, model_id_or_path, weight_format)
        if held is not None:
            return held
    given = Path(model_id_or_path).expanduser()
    if not reconvert and (given / MANIFEST_NAME).is_file():
        return _use_conversion_as_is(given, weight_format)
    model = resolve_model(model_id_or_path, cache_dir=cache_dir, fallback=fallback)
    folder = converted_dir(model, weight_format, cache_dir)
    if folder.parent.is_dir():
        remove_stale_staging(folder)  # what killed conversions left beside it (up to GBs each)
    if reconvert or not folder.is_dir() or not any(folder.iterdir()):
        return convert_florence2(model, folder, weight_format, overwrite=reconvert)
    fix = repair_hint(model_id_or_path, weight_format)
    manifest = verify_conversion(folder, check_hashes="once", fix=fix)
    if manifest.get("weight_format") != weight_format:
        raise IncompleteConversionError(
            f"{folder} holds a {manifest.get('weight_format')} conversion, not {weight_format}. {fix}"
        )
    if int(manifest.get("graph_version", 1)) < GRAPH_VERSION:
        return _upgrade_conversion(model, folder, weight_format)
    return folder  # the folder name already identifies the source and its content (see _slug), even after a move


def _use_conversion_as_is(folder: Path, weight_format: str) -> Path:
    """A folder that already holds an OpenVINO conversion (what a torch-free deployment ships): verified, then used
    in the weight format it holds — converting it to another one would need its PyTorch source and torch."""
    from helpers.ir import verify_conversion

    manifest = verify_conversion(folder, check_hashes="once")
    held = manifest.get("weight_format")
    if held != weight_format:
        print(f"ℹ️  {folder} is an OpenVINO conversion in {held}; using it as it is (you asked for {weight_format}).",
              file=sys.stderr)  # fmt: skip
    return folder


def _upgrade_conversion(model: str, folder: Path, weight_format: str) -> Path:
    """Reconvert a folder written by an older converter (same answers, slower graphs); keep it when the source is
    out of reach (offline, deleted). The conversion is atomic, so a failed attempt leaves the old folder intact."""
    from helpers.convert.conversion import convert_florence2
    from helpers.ir import ConversionError

    print(f"ℹ️  {folder} was converted by an older version of this collection; converting again for speed …")
    try:
        return convert_florence2(model, folder, weight_format, overwrite=True)
    except (ConversionError, OSError) as error:
        print(f"    Could not ({error}). Using the older conversion: same answers, somewhat slower.")
        return folder


def load_model(
    model_id_or_path: str = DEFAULT_MODEL,
    weight_format: str = "fp16",
    device: str = DEFAULT_DEVICE,
    ov_config: dict | None = None,
    *,
    reconvert: bool = False,
    **model_kwargs,
):
    """Convert if needed, then return ``(OVFlorence2Model, processor)`` ready for :func:`helpers.tasks.run.run_task`.
    ``reconvert=True`` converts again over the cached folder (the repair for a damaged one)."""
    from transformers import AutoProcessor

    from helpers.ir import IncompleteConversionError
    from helpers.runtime.ov_model import OVFlorence2Model

    folder = ensure_converted(model_id_or_path, weight_format, reconvert=reconvert)
    model = OVFlorence2Model(folder, device=device, ov_config=ov_config, **model_kwargs)
    try:
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError, TypeError, KeyError) as error:  # a damaged tokenizer.json: UnicodeDecodeError …
        raise IncompleteConversionError(
            f"The processor files in {folder} (tokenizer.json, processor_config.json …) cannot be read "
            f"({type(error).__name__}: {error}). {repair_hint(model_id_or_path, weight_format)}"
        ) from error
    return model, processor
