"""Command line: run one Florence-2 task on an image with OpenVINO, or tasks on a folder of images.

    python -m helpers IMAGE --task "<OD>" [--text ...] [--model ID_OR_DIR|tiny] [--device CPU]
                      [--weight-format fp16] [--out annotated.png]
    python -m helpers FOLDER_OR_GLOB --task "<OD>" [--task "<CAPTION>"] --output-dir out/ [--coco] [--draw]
                      [--batch-size 4]      (batch mode: see helpers/batch.py, or python -m helpers FOLDER -h)

The model is converted on first use and cached under ``FLORENCE2_MODELS_DIR`` (default ``models/``).
The answer is printed as JSON; ``--out`` saves the drawing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from helpers.conversion import WEIGHT_FORMATS
from helpers.models import DEFAULT_DEVICE, load_model, model_from_env


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m helpers", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "image", help="path to an image file (any format Pillow reads); a folder or glob runs batch mode"
    )
    parser.add_argument("--task", default="<CAPTION>", help='task token, e.g. "<OD>" (default: <CAPTION>)')
    parser.add_argument("--text", default=None, help="text input for tasks that take one (phrase, region …)")
    parser.add_argument(
        "--model", default=model_from_env(), help="hub id, local folder, or 'tiny' (default: $FLORENCE2_MODEL or base-ft)"
    )
    parser.add_argument("--device", default=DEFAULT_DEVICE, help="OpenVINO device: CPU, GPU, AUTO … (default: AUTO)")
    parser.add_argument("--weight-format", default="fp16", choices=WEIGHT_FORMATS)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--num-beams", type=int, default=None, help="default: the model's generation config (3)")
    parser.add_argument("--out", type=Path, default=None, help="save the drawn answer to this PNG/JPEG")
    parser.add_argument("--reconvert", action="store_true",
                        help="convert the model again over its cached conversion (repairs a damaged one)")  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from helpers.batch import wants_batch

    if wants_batch(argv):  # a folder or glob: JSONL over every image (helpers/batch.py)
        from helpers.batch import main as batch_main

        return batch_main(argv)
    args = build_parser().parse_args(argv)
    from helpers.plotting import draw_answer
    from helpers.tasks import load_image, run_task

    try:
        image = load_image(args.image)
        model, processor = load_model(args.model, args.weight_format, args.device, reconvert=args.reconvert)
        generate_kwargs = {"max_new_tokens": args.max_new_tokens}
        if args.num_beams is not None:
            generate_kwargs["num_beams"] = args.num_beams
        start = time.perf_counter()
        result = run_task(model, processor, image, args.task, args.text, **generate_kwargs)
        seconds = time.perf_counter() - start
    except (ValueError, FileNotFoundError, OSError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2, ensure_ascii=False))
    print(f"({seconds:.2f} s)", file=sys.stderr)
    if args.out is not None:
        task = next(iter(result))
        draw_answer(image, task, result[task]).save(args.out)
        print(f"drawing saved to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
