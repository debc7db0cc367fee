"""Tiny InternVL2 checkpoints in the original release layout, with a compact tokenizer: the one factory of them.

The demo's base model and the tests' stand-ins for a real release. `internvl_config` is the original config.json of
a tiny InternVL2 of any supported family (InternViT-300M or -6B, with InternLM2, Qwen2, Phi-3 or Llama), keyword
overrides on top (the demo's sizes, a benchmark's real InternVL2-2B); `write_release` writes random weights for a
config, with a tokenizer when given; `write_tiny_model` is the demo's model (InternViT + MLP projector + InternLM2,
`internlm2-chat` template, as InternVL2-2B) with its compact tokenizer, small enough to train on a laptop CPU.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from captune.inputs.templates import get_template

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>"]

VISION_300M = {
    "architectures": ["InternVisionModel"], "model_type": "intern_vit_6b", "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_channels": 3, "image_size": 448, "patch_size": 14,
    "hidden_act": "gelu", "layer_norm_eps": 1e-6, "norm_type": "layer_norm", "qkv_bias": True, "qk_normalization": False,
    "initializer_factor": 0.1,
}
VISIONS = {"300m": VISION_300M, "6b": {**VISION_300M, "norm_type": "rms_norm", "qkv_bias": False, "qk_normalization": True}}

_LLM_COMMON = {"vocab_size": 1024, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "hidden_act": "silu",
               "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "tie_word_embeddings": False}
LLMS = {
    "internlm2": {**_LLM_COMMON, "architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "bias": False,
                  "rope_theta": 1000000, "rope_scaling": {"type": "dynamic", "factor": 2.0},
                  "max_position_embeddings": 4096},
    "qwen2": {**_LLM_COMMON, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "rope_theta": 1000000.0,
              "max_position_embeddings": 4096, "use_sliding_window": False, "sliding_window": 4096},
    # Phi-3-mini-128k: LongRoPE ("su" in its remote code), factors switch past original_max_position_embeddings.
    "phi3": {**_LLM_COMMON, "architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "num_key_value_heads": 4,
             "rope_theta": 10000.0, "max_position_embeddings": 4096, "original_max_position_embeddings": 64,
             "rope_scaling": {"type": "su", "short_factor": [1.0 + 0.1 * i for i in range(8)],
                              "long_factor": [1.5 + 0.5 * i for i in range(8)]}, "sliding_window": 4096},
    # Yi-34B / Llama-3-70B.
    "llama": {**_LLM_COMMON, "architectures": ["LlamaForCausalLM"], "model_type": "llama", "rope_theta": 5000000.0,
              "rope_scaling": None, "max_position_embeddings": 4096, "attention_bias": False},
}
TEMPLATES = {"internlm2": "internlm2-chat", "qwen2": "Hermes-2", "phi3": "phi3-chat", "llama": "Hermes-2"}


def internvl_config(family: str = "internlm2", vision: str = "300m", *, llm: dict | None = None,
                    vit: dict | None = None, **top) -> dict:
    """The original config.json of a tiny InternVL2: `family`'s LLM (internlm2, qwen2, phi3, llama; 2 layers of 64,
    1024-token vocabulary) and InternViT-300M or -6B (`vision`: 2 layers of 64), 448-pixel tiles, float32.

    `llm` and `vit` update `llm_config` and `vision_config`, the other keywords the top level (`force_image_size`,
    `max_dynamic_patch`, `torch_dtype`, `template`, ...).
    """
    config = {
        "architectures": ["InternVLChatModel"], "model_type": "internvl_chat", "downsample_ratio": 0.5,
        "dynamic_image_size": True, "force_image_size": 448, "max_dynamic_patch": 12, "min_dynamic_patch": 1,
        "ps_version": "v2", "select_layer": -1, "template": TEMPLATES[family], "use_thumbnail": True,
        "torch_dtype": "float32", "llm_config": {**LLMS[family], **(llm or {})},
        "vision_config": {**VISIONS[vision], **(vit or {})},
    }
    config.update(top)
    return copy.deepcopy(config)


@dataclass(frozen=True)
class TinySpec:
    """The demo model's sizes (one InternLM2 family model, as InternVL2-2B)."""

    image_size: int = 112  # one tile of 8 x 8 patches: 16 image tokens after the pixel shuffle
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    llm_hidden: int = 128
    llm_layers: int = 2
    llm_heads: int = 4
    llm_kv_heads: int = 2
    llm_intermediate: int = 256
    template: str = "internlm2-chat"

    def config(self, tokenizer) -> dict:
        """`internvl_config` at these sizes, with `tokenizer`'s vocabulary and special tokens."""
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<s>", "</s>")}
        return internvl_config(
            "internlm2", template=self.template, force_image_size=self.image_size, max_dynamic_patch=6,
            llm={"vocab_size": len(tokenizer), "hidden_size": self.llm_hidden, "intermediate_size": self.llm_intermediate,
                 "num_hidden_layers": self.llm_layers, "num_attention_heads": self.llm_heads,
                 "num_key_value_heads": self.llm_kv_heads, "bos_token_id": ids["<s>"], "eos_token_id": ids["</s>"],
                 "pad_token_id": ids["</s>"], "torch_dtype": "float32"},
            vit={"hidden_size": self.vision_hidden, "intermediate_size": 4 * self.vision_hidden,
                 "num_hidden_layers": self.vision_layers, "num_attention_heads": self.vision_heads,
                 "image_size": self.image_size},
        )


def build_compact_tokenizer(texts: list[str], vocab_size: int = 600):
    """A byte-level BPE tokenizer trained on `texts`, with InternVL's special tokens and a `<s>` prefix."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>", unk_token="<unk>",
        additional_special_tokens=SPECIAL_TOKENS[3:], model_max_length=4096, clean_up_tokenization_spaces=False,
    )


def tokenizer_corpus(captions: list[str], questions: list[str], template: str = "internlm2-chat") -> list[str]:
    """Texts the compact tokenizer must cover: the template's system message, the questions, the captions."""
    t = get_template(template)
    return [t.system_message] * 20 + questions * 20 + captions + [t.user, t.assistant]


def random_weights(config: dict, init: str = "trained_head", seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights of the model `config` describes, under the original release's names.

    `init="trained_head"`: transformers' initialisation, with the LM head scaled as a trained model's (with the
    default std of 0.02 a frozen head caps what LoRA can learn); `init="noise"`: every weight random, norms and layer
    scales near 1, the rest N(0, 0.05^2), so that no zero bias or unit norm hides a wrong mapping (conversion tests).
    """
    from transformers import InternVLForConditionalGeneration

    from captune.internvl.config import native_config
    from captune.internvl.keys import KeyMap, original_from_native

    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(native_config(config, None))
    with torch.no_grad():
        if init == "noise":
            for key, t in model.state_dict().items():
                t.copy_((1.0 + 0.1 * torch.randn_like(t)) if ("norm" in key or "lambda" in key)
                        else 0.05 * torch.randn_like(t))
        elif init == "trained_head":
            model.lm_head.weight.normal_(0.0, config["llm_config"]["hidden_size"] ** -0.5)
        else:
            raise ValueError(f"init must be 'trained_head' or 'noise', not {init!r}")
    return dict(original_from_native(model.state_dict().items(), KeyMap(config), {}, "the tiny model"))


def write_release(out: str | Path, config: dict, tokenizer=None, init: str = "trained_head", seed: int = 0,
                  shards: int = 1) -> Path:
    """A release folder in the original layout: config.json, `random_weights(config, init, seed)` in `shards`
    safetensors files (with an index when more than one), and `tokenizer` when given."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    weights = random_weights(config, init, seed)
    if shards == 1:
        save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        keys, weight_map = sorted(weights), {}
        for i in range(shards):
            name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            chunk = {k: weights[k].contiguous() for k in keys[i::shards]}
            save_file(chunk, str(out / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(chunk, name))
        (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def write_tiny_model(out: str | Path, tokenizer, spec: TinySpec = TinySpec(), seed: int = 0) -> Path:
    """A randomly initialised tiny InternVL2 release folder (original layout, `spec`'s sizes) with `tokenizer`."""
    return write_release(out, spec.config(tokenizer), tokenizer, seed=seed)
