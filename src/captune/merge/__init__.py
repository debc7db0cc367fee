"""Folding a LoRA adapter into its base model, shard by shard, and checking the result."""
