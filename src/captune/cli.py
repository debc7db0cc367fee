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

Each sub-command is a plain typed function: its signature and docstring are its arguments and their help
(`captune.cli_args` builds the parsers from them; train's options come from `TrainConfig`). `main` only parses
arguments and turns user errors (`CaptuneError`) into one line on stderr and exit status 2, without a traceback
(numbers out of range are argparse errors, exit status 2, before the command starts: `cli_args.Range`), and Ctrl-C
into `captune: interrupted[: what was kept and how to go on]` and exit status 130.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from captune import cli_args, cli_sizing
from captune.cli_args import AtLeast0, AtLeast1, AutoOrCount, Positive, Range
from captune.errors import CaptuneError, Interrupted

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C

# Old spellings of options, still accepted but not shown: command ("*": every command) -> parameter -> options.
ALIASES = {
    "*": {"num_workers": ("--workers",)},
    "data coco": {"image_root": ("--images",)},
    "data synthetic": {"train_images": ("--train",), "test_images": ("--test",)},
    "bench train": {"token_budgets": ("--budgets",)},
}


def demo(out: str = "runs/demo", train_images: Annotated[int, Range(8)] = 200, test_images: AtLeast1 = 50,
         epochs: Positive = 8.0, force: bool = False) -> dict:
    """The tutorial in miniature, offline, on the CPU (about a minute on 2 cores).

    Data, evaluation, LoRA training, evaluation again, merging, captioning with plain transformers: the tutorial
    end to end, on rendered scenes and a tiny InternVL2 shipped with captune.

    Args:
        out: folder for the data, runs, reports and merged model
        train_images: training images (five captions each; at least 8, one batch of the demo recipe)
        test_images: test images (five references each)
        epochs: passes over the training captions
        force: replace a non-empty --out
    """
    from captune.demo.demo import demo as run

    return run(out, train_images, test_images, epochs, force)


def caption(model: str, images: list[str], question: str | None = None, max_tiles: AtLeast1 = 6,
            max_new_tokens: AtLeast1 = 30, min_new_tokens: Annotated[int, Range(0, not_above="max_new_tokens")] = 8,
            batch_size: AtLeast1 = 8, device: str = "auto", dtype: str = "auto",
            gpus_per_model: AutoOrCount = "auto", compile: Literal["auto", "on", "off"] = "auto") -> list[str]:
    """Caption images: one line per image, in order (greedy, as InternVL2's `model.chat()`).

    A caption's line breaks are escaped so that it stays on its line: a newline is printed as the two characters
    \\n and a backslash as \\\\ (any other line break as Python writes it, e.g. \\r).

    Args:
        model: an InternVL2 checkpoint folder (original or native layout)
        images: image files; one caption line per image, in order
        question: the prompt (default: the tutorial's caption question)
        max_tiles: dynamic tiling: at most this many 448px tiles (+ a thumbnail)
        max_new_tokens: longest caption in tokens (the original: 30)
        min_new_tokens: shortest caption in tokens (the original: 8)
        batch_size: images captioned together
        device: cuda, cpu or auto (a GPU if there is one)
        dtype: bf16, fp16, fp32 or auto (bf16 on a GPU, fp32 on the CPU)
        gpus_per_model: spread the model over K GPUs (auto: the fewest that hold it at --batch-size)
        compile: torch.compile the prompt's repeated blocks (10-20 s once, ~17% faster; auto: on a GPU, >= 4,000 images)
    """
    from captune.eval.generate import (
        GenerationSettings,
        caption_images,
        compile_choice,
        one_line,
    )
    from captune.inputs.tiling import load_image
    from captune.internvl.load import load
    from captune.internvl.placement import assign_gpus

    gpus = assign_gpus(model, gpus_per_model, device, batch_size, dtype=dtype, processes=1)
    pictures = [load_image(p) for p in images]  # fail on a bad image before loading a large model
    net, processor = load(model, dtype=dtype, device=gpus.device, device_map=gpus.device_map)
    if processor is None:
        raise CaptuneError("has no tokenizer files; cannot caption", model)
    settings = GenerationSettings(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens)
    captions = caption_images(net, processor, pictures, question, max_tiles, batch_size, settings,
                              compile=compile_choice(compile, len(pictures), gpus.device))
    for text in captions:
        print(one_line(text), flush=True)
    return captions


def convert(src: Path, out: Path, to: Literal["hf", "internvl"] = "hf", force: bool = False) -> None:
    """Convert a checkpoint between the original and transformers' native layout.

    Tensors are copied bit for bit (same dtype, same sharding); OUT is written atomically.

    Args:
        src: a checkpoint folder (original InternVL2 or native layout)
        out: the converted folder
        to: hf: transformers' native layout; internvl: the original's
        force: replace a non-empty OUT
    """
    from captune.internvl.convert import convert_checkpoint as run

    run(src, out, to=to, force=force)
    print(f"wrote {out} ({'transformers native' if to == 'hf' else 'original InternVL2'} layout)")


def data_coco(*, karpathy: Path, image_root: Path, out: Path) -> None:
    """Write the tutorial's annotation files from Karpathy's dataset_coco.json.

    coco_karpathy_train_567k.jsonl (training), coco_karpathy_test.json and coco_karpathy_test_gt.json (evaluation)
    and InternVL's meta file coco_caption.json.

    Args:
        karpathy: Karpathy's dataset_coco.json
        image_root: the COCO images folder (with train2014/ and val2014/)
        out: where to write the annotation files
    """
    from captune.data.coco import data_coco_command

    data_coco_command(karpathy, image_root, out)


def data_synthetic(out: Path, train_images: AtLeast1 = 400, test_images: AtLeast1 = 100, seed: AtLeast0 = 0,
                   style: AtLeast0 = 0, image_size: Annotated[int, Range(28)] = 448, force: bool = False) -> None:
    """Write a small synthetic caption data set (rendered shapes) in the tutorial's data/coco layout.

    Args:
        out: the data folder to write
        train_images: training images (five captions each)
        test_images: test images (five references each)
        seed: seed of the scenes and captions
        style: also write N images captioned in the base model's style
        image_size: side of the square images in pixels
        force: replace a non-empty OUT
    """
    from captune.data.synthetic import data_synthetic_command

    data_synthetic_command(out, train=train_images, test=test_images, seed=seed, style=style, image_size=image_size,
                           force=force)


def data_check(data: Path, model: Path | None = None, max_tiles: AtLeast1 = 6, max_seq_length: AtLeast1 = 4096,
               num_workers: AtLeast0 | None = None, image_root: Path | None = None) -> None:
    """Validate a training set before hours of training (exit status 1 if anything is wrong).

    Counts missing or unreadable images, malformed lines, empty captions and over-long samples.

    Args:
        data: a data folder, InternVL meta json, jsonl, COCO captions json or dataset_coco.json
        model: a checkpoint folder, to check sample lengths with its tokenizer (default: lengths not checked)
        max_tiles: dynamic tiling: at most this many tiles (+ a thumbnail)
        max_seq_length: samples longer than this are reported
        num_workers: processes decoding images (default: the CPU count, at most 32)
        image_root: folder the image paths are relative to (default: guessed from the data)
    """
    from captune.data.check import data_check_command

    problems = data_check_command(data, model=model, max_tiles=max_tiles, max_seq_length=max_seq_length,
                                  num_workers=num_workers, image_root=image_root)
    if problems:
        raise SystemExit(1)


def evaluate(model: str, data: str | None = None, test_json: str | None = None, gt_json: str | None = None,
             image_root: str | None = None, out: str | None = None, max_tiles: AtLeast1 = 6,
             batch_size: AtLeast1 | None = None, limit: AtLeast1 | None = None, device: str = "auto",
             dtype: str = "auto", spice: bool = False, num_workers: AtLeast0 | None = None,
             force: bool = False, gpus_per_model: AutoOrCount = "auto",
             compile: Literal["auto", "on", "off"] = "auto") -> dict | None:
    """COCO Caption benchmark: caption the test set and score it (also under torchrun).

    Writes results.json, metrics.json and report.html; running the command again resumes.

    Args:
        model: a checkpoint folder (original or native layout, or a captune train checkpoint)
        data: the tutorial's data/coco folder (annotations/coco_karpathy_test*.json); or give --test-json
        test_json: the test image list (COCO Karpathy list, or Flickr30k/NoCaps json) (default: from --data)
        gt_json: the reference captions in COCO format (default: from --data, else --test-json)
        image_root: folder the image paths are relative to (default: --data, else the folder of --test-json)
        out: output folder (default runs/eval-MODELNAME; for a checkpoint runs/eval-RUN-CHECKPOINT)
        max_tiles: dynamic tiling: at most this many tiles (+ a thumbnail)
        batch_size: images per batch (default 64 on a GPU, or the largest of 32, 16, 8 that fits; 4 on the CPU)
        limit: only the first N test images (default: all)
        device: cuda, cpu or auto (under torchrun: this process's GPU)
        dtype: bf16, fp16, fp32 or auto (bf16 on a GPU, fp32 on the CPU)
        spice: also SPICE (downloads Stanford CoreNLP on first use)
        num_workers: image decoding workers (default min(8, CPUs))
        force: discard captions already in --out and start again
        gpus_per_model: spread each model over K GPUs (auto: the fewest that hold it among those dividing each
            process's share of the GPUs, as captune plan lays them out); under torchrun each process takes K
            consecutive GPUs, so --nproc-per-node x K GPUs in all
        compile: torch.compile the prompt's repeated blocks (10-20 s once, ~17% faster; auto: on a GPU, >= 4,000 images)
    """
    from captune.eval.evaluate import evaluate as run

    return run(model, data, test_json, gt_json, image_root, out, max_tiles, batch_size, limit, device, dtype, spice,
               num_workers, force=force, gpus_per_model=gpus_per_model, compile=compile)


def score(results: str, gt: str, spice: bool = False, out: str | None = None) -> dict:
    """Score a COCO results file against COCO-format references with the official scorers.

    Args:
        results: the captions: [{"image_id": ..., "caption": ...}, ...]
        gt: the references in COCO captions format (images + annotations)
        spice: also SPICE (downloads Stanford CoreNLP on first use)
        out: also write the metrics to this JSON file (default: only printed)
    """
    from captune.eval.scoring import score_command

    return score_command(results, gt, spice=spice, out=out)


def train(recipe: str | None, overrides: dict[str, str]) -> Path:
    """LoRA fine-tuning with a recipe (also under torchrun).

    Every field of the training configuration is an option (`--lora-rank 64`, `--no-gradient-checkpointing`;
    booleans also as in a recipe: `--fsdp true`); each shows the value the recipe gives it. The resolved
    configuration is written to OUT/captune.yaml before training starts.

    Args:
        recipe: a shipped recipe name or a YAML file (default: the COCO recipe of the model's size)
        overrides: option -> value typed on the command line, over the recipe's
    """
    from captune.train import config
    from captune.train.loop import train as run

    return run(config.resolve(recipe, overrides))


def _add_train(subparsers: argparse._SubParsersAction, name: str, func: Callable, recipe: str | None) -> None:
    """One option per field of TrainConfig, each with its help and the value that will apply: the recipe's
    (`--recipe` on the same command line, else the one of `--model`'s size, else the tutorial's)."""
    from captune.train import config

    default = config.TrainConfig.recipe
    try:
        applies = config.recipe_values(recipe)
    except CaptuneError:  # an unknown recipe is reported when the command runs, not while building --help
        applies = config.TrainConfig(recipe=recipe or default)
    summary, details, _ = cli_args.checked_helps(func, ("recipe", "overrides"))
    p = subparsers.add_parser(name, help=summary, description=f"{summary}\n\n{details}",
                              formatter_class=cli_args.HelpFormatter)
    p.add_argument("--recipe", default=None,
                   help=f"{config.HELP['recipe']} (default: internvl2_<size>_coco_lora for an InternVL2 release of that "
                        f"size, else {default}; shipped: {', '.join(config.recipe_names())})")
    cli_args.add_config_options(p, config.TrainConfig, config.HELP, applies, required=config.REQUIRED,
                                skip=("recipe",), aliases=ALIASES["*"])
    fields = set(config.TrainConfig.__dataclass_fields__) - {"recipe"}
    p.set_defaults(func=lambda a: func(a.recipe, {k: v for k, v in vars(a).items() if k in fields and v is not None}))


def merge(adapter: str, out: str, format: Literal["hf", "internvl", "both"] = "hf",
          dtype: Literal["bf16", "fp16", "fp32"] = "bf16", force: bool = False, base: str | None = None,
          verify: bool = True, device: str = "auto") -> Path:
    """Merge a LoRA adapter into its base model, shard by shard; check the logits; write atomically.

    Args:
        adapter: a checkpoint folder written by captune train
        out: the merged model's folder
        format: hf: transformers' native layout; internvl: the original's; both: OUT/hf and OUT/internvl
        dtype: dtype of the merged weights
        force: replace a non-empty OUT
        base: the base model (default: the one recorded in the adapter)
        verify: check the merged logits against base + adapter (a model whose float32 copy does not fit the device
            is checked depth-reduced, every weight still compared)
        device: where the checks run: cuda, cpu or auto
    """
    from captune.merge.merge import merge_command

    return merge_command(adapter, out, format=format, dtype=dtype, force=force, base=base, verify=verify,
                         device=device)


def verify_merge(adapter: str, merged: str, base: str | None = None, device: str = "auto") -> float:
    """Check a merged model against base + adapter, as merge does.

    Args:
        adapter: the adapter folder the merge was made from
        merged: the merged model's folder
        base: the base model (default: the one recorded in the adapter)
        device: where the checks run: cuda, cpu or auto
    """
    from captune.merge.merge import verify_merge_command

    return verify_merge_command(adapter, merged, base=base, device=device)


def compare(run_a: Path, run_b: Path, out: Path | None = None) -> Path:
    """Compare two evaluations of one test set in a self-contained HTML page: metrics, then the changed captions.

    Args:
        run_a: an output folder of `captune eval` (the baseline, A)
        run_b: another output folder of `captune eval` on the same test set (B)
        out: the page to write (default: compare.html in the current folder)
    """
    from captune.eval.compare import compare as run

    return run(run_a, run_b, out)


def _commands() -> dict[str, Any]:
    """Sub-command -> its function, or (help, sub-commands) for a group; read when the parser is built."""
    return {
        "demo": demo,
        "caption": caption,
        "eval": evaluate,
        "score": score,
        "train": train,
        "data": ("Prepare, validate or make training data.",
                 {"coco": data_coco, "synthetic": data_synthetic, "check": data_check}),
        "merge": merge,
        "verify-merge": verify_merge,
        "compare": compare,
        "plan": cli_sizing.plan,
        "bench": ("GPU speed: the tutorial's way and captune's side by side (random weights).",
                  {"eval": cli_sizing.bench_eval, "train": cli_sizing.bench_train}),
        "convert": convert,
    }


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The parser of every command; `argv` only picks the recipe whose values `train --help` shows."""
    parser = cli_args.Parser(prog="captune", description=__doc__.split("\n\n")[0],
                             formatter_class=cli_args.HelpFormatter)
    parser.add_argument("--version", action="version", version=f"captune {cli_args.installed_version('captune')}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    recipe = cli_args.option_value(argv, "--recipe")  # train's help shows that recipe's values
    if recipe is None and list(argv[:1]) == ["train"] and (model := cli_args.option_value(argv, "--model")):
        from captune.train.config import default_recipe

        recipe = default_recipe(model)  # else the recipe of the model's size
    cli_args.add_commands(sub, _commands(), ALIASES,
                          builders={"train": lambda s, name, func: _add_train(s, name, func, recipe)})
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
    try:
        args = build_parser(argv).parse_args(argv)
        warnings.showwarning = _show_warning
        _quiet_libraries()
        if getattr(args, "device", None) is not None:  # every command's --device, before any work
            from captune import devices

            devices.check_device(args.device)
        func: Callable = args.func
        func(args)
    except CaptuneError as e:
        print(f"captune: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Interrupted as e:
        print(f"captune: interrupted: {e}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("captune: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
