"""captune: fine-tune InternVL2 on COCO Caption with LoRA, on transformers' native InternVL class.

The public API, re-exported here (imported on first use, so `import captune` stays fast):

    model, processor = captune.load(path)                 # any InternVL2 checkpoint, no remote code
    captune.tile_image(image, max_tiles=6)                # InternVL2's dynamic tiling, [n, 3, 448, 448]
    captune.load_tokenizer(path)                          # InternLM2's tokenizer without remote code
    captune.encode_prompt(tokenizer, question, n, template)
    captune.encode_conversation(tokenizer, conversations, n, template)
    captune.caption_images(model, processor, images)      # batched greedy captions
    captune.convert_checkpoint(src, out, to="hf")         # original <-> native layout on disk
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "load": "captune.internvl.load",
    "resolve_dtype": "captune.devices",
    "Processor": "captune.inputs.processor",
    "DEFAULT_QUESTION": "captune.inputs.processor",
    "tile_image": "captune.inputs.tiling",
    "load_image": "captune.inputs.tiling",
    "load_tokenizer": "captune.internvl.tokenizer",
    "get_template": "captune.inputs.templates",
    "encode_prompt": "captune.inputs.templates",
    "encode_conversation": "captune.inputs.templates",
    "caption_images": "captune.eval.generate",
    "GenerationSettings": "captune.eval.generate",
    "convert_checkpoint": "captune.internvl.convert",
    "CaptuneError": "captune.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'captune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
