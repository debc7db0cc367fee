"""Tiny InternVL2 checkpoints in the original release layout, with a compact tokenizer.

The demo's base model and the tests' stand-ins for a real release: same architecture family as InternVL2-2B
(InternViT + MLP projector + InternLM2, `internlm2-chat` template), small enough to train on a laptop CPU.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from captune.inputs.templates import get_template

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>"]


@dataclass(frozen=True)
class TinySpec:
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


def internvl_config(spec: TinySpec, vocab_size: int, token_ids: dict[str, int]) -> dict:
    return {
        "architectures": ["InternVLChatModel"], "model_type": "internvl_chat", "template": spec.template,
        "downsample_ratio": 0.5, "dynamic_image_size": True, "force_image_size": spec.image_size,
        "max_dynamic_patch": 6, "min_dynamic_patch": 1, "use_thumbnail": True, "ps_version": "v2",
        "select_layer": -1, "torch_dtype": "float32",
        "llm_config": {
            "architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "vocab_size": vocab_size,
            "hidden_size": spec.llm_hidden, "intermediate_size": spec.llm_intermediate,
            "num_hidden_layers": spec.llm_layers, "num_attention_heads": spec.llm_heads,
            "num_key_value_heads": spec.llm_kv_heads, "hidden_act": "silu", "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5, "rope_theta": 1000000, "rope_scaling": {"type": "dynamic", "factor": 2.0},
            "bias": False, "tie_word_embeddings": False, "bos_token_id": token_ids["<s>"],
            "eos_token_id": token_ids["</s>"], "pad_token_id": token_ids["</s>"], "torch_dtype": "float32",
        },
        "vision_config": {
            "architectures": ["InternVisionModel"], "model_type": "intern_vit_6b", "hidden_size": spec.vision_hidden,
            "intermediate_size": 4 * spec.vision_hidden, "num_hidden_layers": spec.vision_layers,
            "num_attention_heads": spec.vision_heads, "num_channels": 3, "image_size": spec.image_size,
            "patch_size": 14, "hidden_act": "gelu", "layer_norm_eps": 1e-6, "norm_type": "layer_norm",
            "qkv_bias": True, "qk_normalization": False, "initializer_factor": 0.1,
        },
    }


def original_state_dict(model, config: dict) -> dict[str, torch.Tensor]:
    """A native model's weights under the original release's names (q/k/v fused back)."""
    from captune.internvl.keys import KeyMap

    keymap = KeyMap(config)
    parts: dict[str, list] = {}
    out: dict[str, torch.Tensor] = {}
    for key, t in model.state_dict().items():
        if "rotary_emb" in key:
            continue
        original, part, rule = keymap.to_original(key)
        if len(rule.native) == 1:
            out[original] = t.detach().contiguous()
        else:
            parts.setdefault(original, [None] * len(rule.native))[part] = t.detach()
            if all(p is not None for p in parts[original]):
                out[original] = rule.fuse(parts.pop(original), config)
    return out


def write_tiny_model(out: str | Path, tokenizer, spec: TinySpec = TinySpec(), seed: int = 0) -> Path:
    """A randomly initialised tiny InternVL2 release folder (original layout) with `tokenizer`."""
    from safetensors.torch import save_file
    from transformers import InternVLForConditionalGeneration

    from captune.internvl.config import native_config

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = internvl_config(spec, len(tokenizer), ids)
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(native_config(config, ids["<IMG_CONTEXT>"]))
    # Trained LMs have an output layer that can make peaked distributions; with transformers' default init
    # (std 0.02) a frozen head caps what LoRA can learn, so scale it as a trained model's.
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, spec.llm_hidden**-0.5)
    save_file(original_state_dict(model, config), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tokenizer.save_pretrained(out)
    return out
