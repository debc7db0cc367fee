"""The `captune` command line: one sub-command per step of the tutorial.

    captune caption MODEL IMAGE...        caption images with any InternVL2 checkpoint
    captune convert SRC OUT --to hf       original release <-> transformers' native layout

Each sub-command is a plain typed function; `main` only parses arguments and turns user errors
(`CaptuneError`) into one line on stderr and exit status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from .errors import CaptuneError

EXIT_USER_ERROR = 2


def caption(
    model: str,
    images: list[str],
    question: str | None = None,
    max_tiles: int = 6,
    max_new_tokens: int = 30,
    min_new_tokens: int = 8,
    batch_size: int = 8,
    device: str = "auto",
    dtype: str = "auto",
) -> list[str]:
    """Print one caption per image, in order (greedy, as InternVL2's `model.chat()`)."""
    from .generate import GenerationSettings, caption_images
    from .model import load
    from .tiling import load_image

    pictures = [load_image(p) for p in images]  # fail on a bad image before loading a large model
    net, processor = load(model, dtype=dtype, device=device)
    if processor is None:
        raise CaptuneError("has no tokenizer files; cannot caption", model)
    settings = GenerationSettings(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens)
    captions = caption_images(net, processor, pictures, question, max_tiles, batch_size, settings)
    for text in captions:
        print(text, flush=True)
    return captions


def convert(src: str, out: str, to: str = "hf", force: bool = False) -> None:
    """Write a checkpoint in the other layout (bit-identical tensors, same sharding)."""
    from .convert import convert_checkpoint as run

    run(src, out, to=to, force=force)
    print(f"wrote {out} ({'transformers native' if to == 'hf' else 'original InternVL2'} layout)")


def _add_generation_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--question", default=None, help="default: the tutorial's caption question")
    p.add_argument("--max-tiles", type=int, default=6, help="dynamic tiling: at most this many 448px tiles (+ thumbnail)")
    p.add_argument("--max-new-tokens", type=int, default=30)
    p.add_argument("--min-new-tokens", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto", help="cuda, cpu or auto (default)")
    p.add_argument("--dtype", default="auto", help="bf16, fp32 or auto: bf16 on GPU, fp32 on CPU")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="captune", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("caption", help="caption images")
    p.add_argument("model", help="an InternVL2 checkpoint folder (original or native layout)")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    _add_generation_options(p)
    p.set_defaults(func=lambda a: caption(a.model, a.images, a.question, a.max_tiles, a.max_new_tokens,
                                          a.min_new_tokens, a.batch_size, a.device, a.dtype))

    p = sub.add_parser("convert", help="convert a checkpoint between the original and the native layout")
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--to", choices=["hf", "internvl"], default="hf")
    p.add_argument("--force", action="store_true", help="replace a non-empty OUT")
    p.set_defaults(func=lambda a: convert(a.src, a.out, a.to, a.force))
    return parser


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # captune never downloads; a missing file is a clear error
    warnings.filterwarnings("ignore", category=FutureWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"captune: warning: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.showwarning = _show_warning
    _quiet_libraries()
    func: Callable = args.func
    try:
        func(args)
    except CaptuneError as e:
        print(f"captune: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("captune: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
