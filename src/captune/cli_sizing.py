"""The command line's sizing commands: what a model needs (`captune plan`) and how fast it runs (`captune bench`).

Plain typed functions, like those of `cli.py`; their parsers are generated from the signatures and docstrings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from captune.cli_args import AtLeast0, AtLeast1, Positive, Range


def plan(model: Path, gpus: AtLeast1 = 1, gpu_memory: Positive = 80.0, recipe: str | None = None,
         json: bool = False) -> dict:
    """Plan evaluation and LoRA training of a model from its config.json: memory per GPU, strategy, time.

    Args:
        model: a model folder (only its config.json is read; original or native layout) or a config.json
        gpus: GPUs on the machine
        gpu_memory: memory of each GPU in GB (2^30 bytes; 10% is kept free)
        recipe: the training recipe (default: the model size's internvl2_<size>_coco_lora)
        json: print JSON instead of a table
    """
    from captune.internvl.plan import plan as run

    return run(model, gpus=gpus, gpu_memory=gpu_memory, recipe=recipe, json=json)


def bench_eval(tokenizer: str | None = None, images: AtLeast1 = 640, baseline_images: AtLeast1 = 24,
               batch_sizes: Annotated[str, Range(1, sep=",")] = "64", num_workers: AtLeast0 = 12,
               new_tokens: AtLeast1 = 30, agreement_images: AtLeast0 = 128, profile: bool = False,
               device: str = "cuda", out: str | None = None) -> dict:
    """Captioning end to end, same GPU, same run: (a) one image at a time (the original), (b) captune, (c) plain
    transformers generate on the same batches; the captions' agreement and where (b)'s time goes.

    Args:
        tokenizer: an InternLM2 tokenizer folder (default: a compact stand-in)
        images: images captioned by (b) and (c)
        baseline_images: images captioned one at a time (the original's way)
        batch_sizes: batch sizes to measure, comma-separated
        num_workers: image decoding workers
        new_tokens: tokens generated per image (exactly: the work is fixed)
        agreement_images: images also captioned at batch 1, to count the captions that batching changes
        profile: also write a torch.profiler table of one batch (profile_eval.txt in OUT)
        device: the GPU to measure
        out: folder for bench_eval.json (default: only printed)
    """
    from captune.demo.bench_eval import bench_eval as run

    return run(tokenizer, images=images, baseline_images=baseline_images,
               batch_sizes=tuple(int(b) for b in batch_sizes.split(",")), workers=num_workers, tokens=new_tokens,
               agreement_images=agreement_images, profile=profile, device=device, out=out)


def bench_train(tokenizer: str | None = None, steps: AtLeast1 = 8, token_budgets: Annotated[str, Range(1, sep=",")] =
                "16384", device: str = "cuda", out: str | None = None, brief: bool = False) -> dict:
    """Training: one caption per sample (the tutorial) vs shared-prefix packing (captune), same GPU, same run.

    Args:
        tokenizer: an InternLM2 tokenizer folder (default: a compact stand-in)
        steps: timed optimizer steps per variant
        token_budgets: tokens per packed micro-batch, comma-separated (the first is the default row)
        device: the GPU to measure
        out: folder for bench_train.json (default: only printed)
        brief: only (a) the tutorial's way and (b) captune's, without the variants between them
    """
    from captune.demo.bench import bench_train as run

    return run(tokenizer, steps=steps, budgets=tuple(int(b) for b in token_budgets.split(",")), device=device,
               out=out, steps_between=not brief)
