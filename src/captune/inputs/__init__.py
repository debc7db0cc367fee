"""What the model is fed: InternVL2's tiling, its conversation templates, and the processor that joins them."""
