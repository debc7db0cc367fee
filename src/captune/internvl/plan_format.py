"""`captune plan`'s result as the table it prints."""

from __future__ import annotations

from captune.internvl.plan import (
    COCO_CAPTIONS,
    EVAL_IMAGES,
    EVAL_NEW_TOKENS,
    EVAL_PROMPT,
    EVAL_TILES,
)


def format_plan(r: dict) -> str:
    """The plan as a readable table."""
    m, p, e, t = r["model"], r["parameters"], r["eval"], r["train"]
    lines = [(f"{m['release'] or 'InternVL2 model'}: {m['vision']} + {m['llm']} (vocabulary {m['vocab']:,}), "
              f"{p['total'] / 1e9:.2f} B parameters, {r['weights_gb']:.1f} GB in bf16")]
    lines += [f"  {k.replace('_', ' '):<16}{v:>16,}" for k, v in p.items() if k != "total"]
    lines.append(f"GPUs: {r['gpus']} x {r['gpu_memory_gb']:g} GB ({r['usable_gb']:.0f} GB usable each)")
    lines.append(f"Evaluation ({EVAL_IMAGES:,} COCO test images, {EVAL_TILES} tiles: {EVAL_PROMPT:,}-token prompt, "
                 f"{EVAL_NEW_TOKENS} new tokens)")
    k, mem = e["gpus_per_model"], e["memory_gb"]
    lines.append(f"  strategy       {e['replicas']} replica{'s' if e['replicas'] > 1 else ''} x {k} GPU"
                 f"{'s' if k > 1 else ''} per model, batch {e['batch']}{', compiled' * e['compiled']}" if e["fits"] else
                 f"  does not fit   {e['message']}")
    lines.append(f"  per GPU        weights {mem['weights']:.1f} + KV cache {mem['kv_cache']:.1f} + activations "
                 f"{mem['activations']:.1f} = {mem['total']:.1f} GB")
    if e["fits"]:
        lines.append(f"  time           {e['images_per_s']:.1f} images/s: {e['minutes']:.1f} min")
    mem, total, over = t["memory_gb"], t["total_gb"], f" over {t['gpus']} GPUs" if t["gpus"] > 1 else ""
    lines.append(f"Training (recipe {t['recipe']}: LoRA r{t['lora_rank']} on the LLM, {t['trainable']:,} trainable)")
    lines.append(f"  strategy       {t['strategy']}{over}, checkpointing {'on' if t['gradient_checkpointing'] else 'off'}"
                 f", token budget {t['token_budget']:,} ({t['images_per_micro_batch']} image"
                 f"{'s' if t['images_per_micro_batch'] > 1 else ''}), compile {'on' if t['compile'] else 'off'}"
                 if t["fits"] else f"  does not fit   {t['message']}")
    lines.append(f"  per GPU        frozen weights {mem['weights']:.1f} + LoRA weights/grads/AdamW {mem['lora_states']:.1f}"
                 f" + activations {mem['activations']:.1f} = {mem['total']:.1f} GB (checkpointing on "
                 f"{total['checkpointing_on']:.1f}, off {total['checkpointing_off']:.1f})")
    if t["fits"]:
        lines.append(f"  time           {t['tokens_per_s']:,.0f} tokens/s: one COCO epoch ({COCO_CAPTIONS:,} captions) "
                     f"{t['hours_per_epoch']:.1f} h")
    if t.get("note"):
        lines.append(f"  note           {t['note']}")
    return "\n".join(lines)
