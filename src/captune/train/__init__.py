"""LoRA fine-tuning: the typed config and recipes, datasets and batching, shared-prefix packing, the loss, the loop,
its checkpoints and logs."""
