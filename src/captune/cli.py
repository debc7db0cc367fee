"""The `captune` command line: one sub-command per step of the tutorial.

    captune demo                          the whole tutorial in miniature, offline, on the CPU
    captune caption MODEL IMAGE...        caption images with any InternVL2 checkpoint
    captune convert SRC OUT --to hf       original release <-> transformers' native layout
    captune eval MODEL --data data/coco   the COCO Caption benchmark (BLEU, METEOR, ROUGE-L, CIDEr)
    captune score RESULTS GT              score any captions file with the official COCO metrics
    captune train --model M --data D --out OUT [--recipe R] [--key value ...]   LoRA fine-tuning
    captune data coco|check|synthetic     prepare, validate or make training data
    captune merge ADAPTER OUT             merge a LoRA run into a model anyone can load (checked)
    captune bench eval|train              GPU speed, the tutorial's way and captune's, side by side

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

from captune.errors import CaptuneError

EXIT_USER_ERROR = 2


def demo(out: str = "runs/demo", train_images: int = 200, test_images: int = 50, epochs: float = 8.0,
         force: bool = False) -> dict:
    """Data, eval, LoRA training, eval, merge, plain-transformers captioning: the tutorial end to end."""
    from captune.demo.demo import demo as run

    return run(out, train_images, test_images, epochs, force)


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
    from captune.eval.generate import GenerationSettings, caption_images
    from captune.inputs.tiling import load_image
    from captune.internvl.load import load

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
    from captune.internvl.convert import convert_checkpoint as run

    run(src, out, to=to, force=force)
    print(f"wrote {out} ({'transformers native' if to == 'hf' else 'original InternVL2'} layout)")


def data_coco(karpathy: str, images: str, out: str) -> None:
    """Write coco_karpathy_train_567k.jsonl, coco_karpathy_test.json and coco_karpathy_test_gt.json."""
    from captune.data.coco import data_coco_command

    data_coco_command(karpathy, images, out)


def data_synthetic(out: str, train: int = 400, test: int = 100, seed: int = 0, style: int = 0, image_size: int = 448,
                   force: bool = False) -> None:
    """Render shapes scenes with five reference captions each, in the tutorial's data/coco layout."""
    from captune.data.synthetic import data_synthetic_command

    data_synthetic_command(out, train=train, test=test, seed=seed, style=style, image_size=image_size, force=force)


def data_check(data: str, model: str | None = None, max_tiles: int = 6, max_seq_length: int = 4096,
               workers: int | None = None, image_root: str | None = None) -> None:
    """Count missing or unreadable images, malformed lines, empty captions, over-long samples."""
    from captune.data.check import data_check_command

    problems = data_check_command(data, model=model, max_tiles=max_tiles, max_seq_length=max_seq_length,
                                  workers=workers, image_root=image_root)
    if problems:
        raise SystemExit(1)


def evaluate(model: str, data: str | None = None, test_json: str | None = None, gt_json: str | None = None,
             image_root: str | None = None, out: str | None = None, max_tiles: int = 6,
             batch_size: int | None = None, limit: int | None = None, device: str = "auto", dtype: str = "auto",
             spice: bool = False, num_workers: int | None = None, force: bool = False) -> dict | None:
    """Caption the test set, score it, write results.json, metrics.json and report.html."""
    from captune.eval.evaluate import evaluate as run

    return run(model, data, test_json, gt_json, image_root, out, max_tiles, batch_size, limit, device, dtype, spice,
               num_workers, force=force)


def score(results: str, gt: str, spice: bool = False, out: str | None = None) -> dict:
    """Score a COCO results file with the official scorers (as the tutorial's evaluation)."""
    from captune.eval.scoring import score_command

    return score_command(results, gt, spice=spice, out=out)


def train(recipe: str | None, overrides: dict[str, str]) -> Path:
    """LoRA fine-tuning; the resolved configuration is written to OUT/captune.yaml before training starts."""
    from captune.train import config
    from captune.train.loop import train as run

    return run(config.resolve(recipe, overrides))


def _add_train_options(p: argparse.ArgumentParser, recipe: str | None) -> None:
    """One option per field of TrainConfig (`--lora-rank 64`, `--gradient-checkpointing false`, ...), each with its
    help and the value that will apply: the recipe's (`--recipe` on the same command line, else the default one)."""
    import dataclasses

    from captune.train.config import HELP, REQUIRED, TrainConfig, recipe_values

    try:
        applies = recipe_values(recipe)
    except CaptuneError:  # an unknown recipe is reported when the command runs, not while building --help
        applies = TrainConfig(recipe=recipe or TrainConfig.recipe)
    p.add_argument("--recipe", default=None, help=f"{HELP['recipe']} (default {TrainConfig.recipe}; shipped: "
                                                  "demo_lora, internvl2_2b_coco_lora, tiny_cpu_lora)")
    for f in dataclasses.fields(TrainConfig):
        if f.name == "recipe":
            continue
        value = getattr(applies, f.name)
        shown = "required" if f.name in REQUIRED else (
            f"{applies.recipe}: {','.join(map(str, value)) if isinstance(value, tuple) else value!s}" if value != ""
            else "unset")
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            p.add_argument(flag, nargs="?", const="true", default=None, metavar="BOOL", help=f"{HELP[f.name]} ({shown})")
        else:
            p.add_argument(flag, default=None, metavar=f.name.split("_")[-1].upper(), help=f"{HELP[f.name]} ({shown})")


def _recipe_in(argv: Sequence[str]) -> str | None:
    """The value of --recipe on a command line, before it is parsed (train's help shows that recipe's values)."""
    for i, arg in enumerate(argv):
        if arg == "--recipe" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--recipe="):
            return arg.split("=", 1)[1]
    return None


def merge(adapter: str, out: str, format: str = "hf", dtype: str = "bf16", force: bool = False,
          base: str | None = None, verify: bool = True, device: str = "auto") -> Path:
    """Merge LoRA weights into the base, shard by shard; check the logits; write atomically."""
    from captune.merge.merge import merge_command

    return merge_command(adapter, out, format=format, dtype=dtype, force=force, base=base, verify=verify,
                         device=device)


def verify_merge(adapter: str, merged: str, base: str | None = None, device: str = "auto") -> float:
    """`captune merge`'s checks on a merged folder; returns the relative logits error against base + adapter."""
    from captune.merge.merge import verify_merge_command

    return verify_merge_command(adapter, merged, base=base, device=device)


def bench_eval(tokenizer: str | None = None, images: int = 640, baseline_images: int = 24,
               batch_sizes: str = "64,128", workers: int = 12, device: str = "cuda", out: str | None = None) -> dict:
    """Images/s of captioning one image at a time (the original) and batched (captune), same GPU, same run."""
    from captune.demo.bench import bench_eval as run

    return run(tokenizer, images=images, baseline_images=baseline_images,
               batch_sizes=tuple(int(b) for b in batch_sizes.split(",")), workers=workers, device=device, out=out)


def bench_train(tokenizer: str | None = None, steps: int = 8, budgets: str = "16384", device: str = "cuda",
                out: str | None = None, brief: bool = False) -> dict:
    """Caption-samples/s of the tutorial's training and of shared-prefix packing, same GPU, same run."""
    from captune.demo.bench import bench_train as run

    return run(tokenizer, steps=steps, budgets=tuple(int(b) for b in budgets.split(",")), device=device, out=out,
               steps_between=not brief)


def _add_generation_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--question", default=None, help="default: the tutorial's caption question")
    p.add_argument("--max-tiles", type=int, default=6, help="dynamic tiling: at most this many 448px tiles (+ thumbnail)")
    p.add_argument("--max-new-tokens", type=int, default=30, help="longest caption in tokens (the original: 30)")
    p.add_argument("--min-new-tokens", type=int, default=8, help="shortest caption in tokens (the original: 8)")
    p.add_argument("--batch-size", type=int, default=8, help="images captioned together")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto (default)")
    p.add_argument("--dtype", default="auto", help="bf16, fp32 or auto: bf16 on GPU, fp32 on CPU")


class _ShowDefaults(argparse.HelpFormatter):
    """Help lines end with the option's default, where it has one (None and False are no default)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS) and "default" not in text:
            text += " (default %(default)s)"
        return text


def _show_defaults(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ("train",)) -> None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                if name not in skip:  # train shows the recipe's values itself
                    sub.formatter_class = _ShowDefaults
                    _show_defaults(sub, skip)


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="captune", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="the tutorial in miniature, offline, on the CPU (a few minutes)")
    p.add_argument("--out", default="runs/demo", help="folder for the data, runs, reports and merged model")
    p.add_argument("--train-images", type=int, default=200, help="training images (five captions each)")
    p.add_argument("--test-images", type=int, default=50, help="test images")
    p.add_argument("--epochs", type=float, default=8.0, help="passes over the training captions")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=lambda a: demo(a.out, a.train_images, a.test_images, a.epochs, a.force))

    p = sub.add_parser("caption", help="caption images")
    p.add_argument("model", help="an InternVL2 checkpoint folder (original or native layout)")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files; one caption line per image, in order")
    _add_generation_options(p)
    p.set_defaults(func=lambda a: caption(a.model, a.images, a.question, a.max_tiles, a.max_new_tokens,
                                          a.min_new_tokens, a.batch_size, a.device, a.dtype))

    p = sub.add_parser("eval", help="COCO Caption benchmark: caption the test set and score it")
    p.add_argument("model", help="a checkpoint folder (original or native layout)")
    p.add_argument("--data", help="the tutorial's data/coco folder (annotations/coco_karpathy_test*.json)")
    p.add_argument("--test-json", help="the test image list (COCO Karpathy list, or Flickr30k/NoCaps json)")
    p.add_argument("--gt-json", help="the reference captions in COCO format (default: --test-json)")
    p.add_argument("--image-root", help="folder the image paths are relative to")
    p.add_argument("--out", help="output folder (default runs/eval-MODELNAME); re-running resumes")
    p.add_argument("--max-tiles", type=int, default=6, help="dynamic tiling: at most this many tiles (+ thumbnail)")
    p.add_argument("--batch-size", type=int, default=None, help="images per batch (default 64 on GPU, 4 on CPU)")
    p.add_argument("--limit", type=int, default=None, help="only the first N test images")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto (default; under torchrun: this process's GPU)")
    p.add_argument("--dtype", default="auto", help="bf16, fp32 or auto: bf16 on GPU, fp32 on CPU")
    p.add_argument("--num-workers", type=int, default=None, help="image decoding workers (default min(8, CPUs))")
    p.add_argument("--spice", action="store_true", help="also SPICE (downloads Stanford CoreNLP on first use)")
    p.add_argument("--force", action="store_true", help="discard captions already in --out and start again")
    p.set_defaults(func=lambda a: evaluate(a.model, a.data, a.test_json, a.gt_json, a.image_root, a.out, a.max_tiles,
                                           a.batch_size, a.limit, a.device, a.dtype, a.spice, a.num_workers,
                                           force=a.force))

    p = sub.add_parser("score", help="score a COCO results file against COCO-format references")
    p.add_argument("results", help="[{\"image_id\": ..., \"caption\": ...}, ...]")
    p.add_argument("gt", help="COCO captions format: images + annotations")
    p.add_argument("--spice", action="store_true", help="also SPICE (downloads Stanford CoreNLP on first use)")
    p.add_argument("--out", help="write the metrics to this JSON file")
    p.set_defaults(func=lambda a: score(a.results, a.gt, a.spice, a.out))

    p = sub.add_parser("train", help="LoRA fine-tuning with a recipe (also under torchrun)")
    _add_train_options(p, _recipe_in(argv))
    p.set_defaults(func=lambda a: train(a.recipe, {k: v for k, v in vars(a).items()
                                                   if v is not None and k not in ("recipe", "func", "command")}))

    p = sub.add_parser("data", help="prepare or check training data")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    q = data_sub.add_parser("coco", help="write the tutorial's annotation files from Karpathy's dataset_coco.json")
    q.add_argument("--karpathy", required=True, help="Karpathy's dataset_coco.json")
    q.add_argument("--images", required=True, help="the COCO images folder (with train2014/ and val2014/)")
    q.add_argument("--out", required=True, help="where to write the annotation files")
    q.set_defaults(func=lambda a: data_coco(a.karpathy, a.images, a.out))
    q = data_sub.add_parser("synthetic", help="write a small synthetic caption data set (shapes) in the tutorial's layout")
    q.add_argument("out", help="the data folder to write (the tutorial's data/coco layout)")
    q.add_argument("--train", type=int, default=400, help="training images (5 captions each)")
    q.add_argument("--test", type=int, default=100, help="test images")
    q.add_argument("--seed", type=int, default=0, help="seed of the scenes and captions")
    q.add_argument("--style", type=int, default=0, help="also write N images captioned in the base model's style")
    q.add_argument("--image-size", type=int, default=448, help="side of the square images in pixels")
    q.add_argument("--force", action="store_true", help="replace a non-empty OUT")
    q.set_defaults(func=lambda a: data_synthetic(a.out, a.train, a.test, a.seed, a.style, a.image_size, a.force))
    q = data_sub.add_parser("check", help="validate a training set before hours of training")
    q.add_argument("data", help="a data folder, InternVL meta json, jsonl, COCO captions json or dataset_coco.json")
    q.add_argument("--model", help="a checkpoint folder, to check sample lengths with its tokenizer")
    q.add_argument("--max-tiles", type=int, default=6, help="dynamic tiling: at most this many tiles (+ thumbnail)")
    q.add_argument("--max-seq-length", type=int, default=4096, help="samples longer than this are reported")
    q.add_argument("--num-workers", "--workers", dest="num_workers", type=int, default=None,
                   help="processes decoding images (default: the CPU count, at most 32)")
    q.add_argument("--image-root", default=None, help="folder the image paths are relative to (default: guessed)")
    q.set_defaults(func=lambda a: data_check(a.data, a.model, a.max_tiles, a.max_seq_length, a.num_workers,
                                             a.image_root))

    p = sub.add_parser("merge", help="merge a LoRA adapter into its base model, checked")
    p.add_argument("adapter", help="a checkpoint folder written by captune train")
    p.add_argument("out", help="the merged model's folder (written atomically)")
    p.add_argument("--format", choices=["hf", "internvl", "both"], default="hf",
                   help="hf: transformers' native layout; internvl: the original's; both: OUT/hf and OUT/internvl")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16", help="dtype of the merged weights")
    p.add_argument("--force", action="store_true", help="replace a non-empty OUT")
    p.add_argument("--base", default=None, help="the base model (default: the one recorded in the adapter)")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip the check against the adapter (it holds the model in float32: 26B and up)")
    p.add_argument("--device", default="auto", help="where the checks run: cuda, cpu or auto")
    p.set_defaults(func=lambda a: merge(a.adapter, a.out, a.format, a.dtype, a.force, a.base, a.verify, a.device))

    p = sub.add_parser("verify-merge", help="check a merged model against base + adapter, as merge does")
    p.add_argument("adapter", help="the adapter folder the merge was made from")
    p.add_argument("merged", help="the merged model's folder")
    p.add_argument("--base", default=None, help="the base model (default: the one recorded in the adapter)")
    p.add_argument("--device", default="auto", help="where the checks run: cuda, cpu or auto")
    p.set_defaults(func=lambda a: verify_merge(a.adapter, a.merged, a.base, a.device))

    p = sub.add_parser("bench", help="GPU speed: the tutorial's way and captune's side by side (random weights)")
    bench_sub = p.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    q = bench_sub.add_parser("eval", help="captioning: one image at a time vs batched, end to end")
    q.add_argument("--tokenizer", help="an InternLM2 tokenizer folder (default: a compact stand-in)")
    q.add_argument("--images", type=int, default=640, help="images captioned by captune's batched path")
    q.add_argument("--baseline-images", type=int, default=24, help="images captioned one at a time (the original's way)")
    q.add_argument("--batch-sizes", default="64,128", help="batch sizes to measure, comma-separated")
    q.add_argument("--num-workers", "--workers", dest="workers", type=int, default=12, help="image decoding workers")
    q.add_argument("--device", default="cuda", help="the GPU to measure")
    q.add_argument("--out", default=None, help="folder for bench_eval.json")
    q.set_defaults(func=lambda a: bench_eval(a.tokenizer, a.images, a.baseline_images, a.batch_sizes, a.workers,
                                             a.device, a.out))
    q = bench_sub.add_parser("train", help="training: one caption per sample vs shared-prefix packing")
    q.add_argument("--tokenizer", help="an InternLM2 tokenizer folder (default: a compact stand-in)")
    q.add_argument("--steps", type=int, default=8, help="timed optimizer steps per variant")
    q.add_argument("--budgets", default="16384",
                   help="token budgets per packed micro-batch, comma-separated (the first is the default row)")
    q.add_argument("--device", default="cuda", help="the GPU to measure")
    q.add_argument("--out", default=None, help="folder for bench_train.json")
    q.add_argument("--brief", action="store_true",
                   help="only (a) the tutorial's way and (b) the default, without the variants between them")
    q.set_defaults(func=lambda a: bench_train(a.tokenizer, a.steps, a.budgets, a.device, a.out, a.brief))

    p = sub.add_parser("convert", help="convert a checkpoint between the original and the native layout")
    p.add_argument("src", help="a checkpoint folder (original InternVL2 or native layout)")
    p.add_argument("out", help="the converted folder (written atomically)")
    p.add_argument("--to", choices=["hf", "internvl"], default="hf", help="hf: transformers' native layout; internvl: the original")
    p.add_argument("--force", action="store_true", help="replace a non-empty OUT")
    p.set_defaults(func=lambda a: convert(a.src, a.out, a.to, a.force))
    _show_defaults(parser)
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
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
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
