"""`captune demo`: the whole tutorial in miniature, offline, on a laptop CPU, in a few minutes.

    captune demo --out runs/demo

1. make a caption data set (synthetic scenes, five reference captions per image, the tutorial's layout)
2. `captune eval` the shipped base model, which already captions, in its own style
3. `captune train` LoRA with the recipe machinery of the real run (scaled down)
4. `captune eval` the adapter
5. `captune merge` it into a folder plain transformers loads
6. load that folder with transformers alone and caption a few test images
"""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path

from captune.errors import CaptuneError

METRICS = ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"]


def base_model_path() -> Path:
    path = Path(str(resources.files("captune.demo") / "assets" / "demo_base"))
    if not (path / "config.json").is_file():
        raise CaptuneError("the demo's base model is missing from the installation (assets/demo_base)", path)
    return path


def train_demo(data: Path, out: Path, **overrides) -> Path:
    """LoRA-train the shipped base model on the demo's data with the `demo_lora` recipe; the adapter's folder."""
    from captune.train import config as cfg
    from captune.train.loop import train

    return train(cfg.resolve("demo_lora", {"model": str(base_model_path()), "data": str(data), "out": str(out),
                                           **overrides}))


def evaluate_demo(model: str | Path, data: Path, out: Path) -> dict:
    """The demo's test set captioned and scored as the demo does it: one 112px tile per image, float32, CPU."""
    from captune.eval.evaluate import evaluate

    return evaluate(str(model), data=str(data), out=str(out), device="cpu", dtype="fp32", batch_size=16,
                    num_workers=0, max_tiles=1)


def _step(n: int, text: str) -> None:
    print(f"\n[{n}/6] {text}", flush=True)


def caption_with_plain_transformers(merged: Path, images: list[Path], question: str) -> list[str]:
    """Caption with nothing but transformers' own classes and the merged folder's tokenizer and chat template;
    only the image tiling is InternVL2's (transformers' image processor is not pixel-identical to it)."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    from captune.inputs.tiling import tile_image

    model = AutoModelForImageTextToText.from_pretrained(merged, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(merged)
    tile = model.config.vision_config.image_size[0]
    tokens_per_tile = model.config.image_seq_length
    captions = []
    for image in images:
        pixels = tile_image(image, max_tiles=1, tile_size=tile)  # [1, 3, S, S]
        text = tokenizer.apply_chat_template([{"role": "user", "content": "<image>\n" + question}],
                                             add_generation_prompt=True, tokenize=False)
        text = text.replace("<image>", "<img>" + "<IMG_CONTEXT>" * tokens_per_tile * pixels.shape[0] + "</img>", 1)
        ids = tokenizer(text, return_tensors="pt").input_ids
        out = model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=30, min_new_tokens=8,
                             do_sample=False)
        captions.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return captions


def format_table(before: dict, after: dict) -> str:
    lines = [f"{'metric':<10}{'base':>10}{'fine-tuned':>12}", "-" * 32]
    for m in METRICS:
        lines.append(f"{m:<10}{before[m]:>10.3f}{after[m]:>12.3f}")
    return "\n".join(lines)


def demo(out: str = "runs/demo", train_images: int = 200, test_images: int = 50, epochs: float = 8.0,
         force: bool = False) -> dict:
    """Run the tutorial end to end on synthetic data; return the metrics before and after fine-tuning."""
    import json
    import shutil

    from captune.data.synthetic import make_synthetic_dataset
    from captune.inputs.processor import DEFAULT_QUESTION
    from captune.merge.merge import merge

    start = time.perf_counter()
    out_dir = Path(out)
    if out_dir.exists():
        if not force and any(out_dir.iterdir()):
            raise CaptuneError("folder exists and is not empty (pass --force to replace it)", out_dir)
        shutil.rmtree(out_dir)
    base = base_model_path()

    _step(1, f"caption data: {train_images} training images x 5 captions, {test_images} test images")
    data = make_synthetic_dataset(out_dir / "data", train=train_images, test=test_images, seed=0)

    _step(2, f"captune eval {base.name} --max-tiles 1 (the base model, original InternVL2 layout; one 112px tile)")
    before = evaluate_demo(base, out_dir / "data", out_dir / "eval-base")

    _step(3, "captune train --recipe demo_lora (LoRA on the LLM, shared-prefix packing)")
    adapter = train_demo(out_dir / "data", out_dir / "run", epochs=epochs)

    _step(4, f"captune eval {adapter} (base + adapter)")
    after = evaluate_demo(adapter, out_dir / "data", out_dir / "eval-finetuned")

    _step(5, "captune merge")
    merged = merge(adapter, out_dir / "merged", format="hf", dtype="fp32", force=True)

    _step(6, "caption with plain transformers (AutoModelForImageTextToText + AutoTokenizer) from the merged folder")
    tests = json.loads(Path(data["test"]).read_text())[:3]
    images = [out_dir / "data" / t["image"] for t in tests]
    for image, caption, test in zip(images, caption_with_plain_transformers(merged, images, DEFAULT_QUESTION), tests):
        print(f"  {image.name}: {caption!r}\n    reference: {test['caption'][0]!r}")

    print("\nCOCO caption metrics on the test set (official scorers), before and after LoRA fine-tuning:\n")
    print(format_table(before, after))
    print(f"\nreport (worst captions first): {out_dir / 'eval-finetuned' / 'report.html'}")
    print(f"TensorBoard:                   tensorboard --logdir {out_dir / 'run' / 'tensorboard'}")
    print(f"merged model (transformers):   {merged}")
    print(f"done in {time.perf_counter() - start:.0f} s")
    return {"before": before, "after": after, "merged": str(merged)}
