"""Load an InternVL2 tokenizer as a transformers fast tokenizer, without running any remote code.

InternVL2 releases built on InternLM2 ship only `tokenizer.model` (SentencePiece BPE) plus a tokenizer_config.json
whose `auto_map` points at a remote-code `InternLM2Tokenizer`. captune never runs remote code, so for those folders it
builds the equivalent fast tokenizer itself from the SentencePiece proto: same ids, same splits, same decoding as
the original slow tokenizer (but for one kind of run of byte pieces that no tokenizers decoder can express, see
`_BYTE_RUN_SPLITS`; captune decodes captions with `inputs.processor.decode_ids`, as SentencePiece for any ids). Every
other folder (anything with a tokenizer.json, Qwen2, Phi-3, Llama...) is loaded with `AutoTokenizer`.

The result is saved by `save_pretrained` as a plain `tokenizer.json` + tokenizer_config.json that any transformers
version loads with `AutoTokenizer.from_pretrained`, without captune.
"""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path
from typing import Any

import transformers
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    processors,
)

from captune.errors import CaptuneError
from captune.inputs.templates import token_id

IMAGE_TOKENS = ("<img>", "</img>", "<IMG_CONTEXT>")

# SentencePiece piece types (sentencepiece_model.proto).
_NORMAL, _USER_DEFINED = 1, 4

# Files that make a folder a tokenizer folder; without any of them AutoTokenizer's errors are obscure.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "vocab.txt",
                    "spiece.model", "sentencepiece.bpe.model", "tekken.json")

# A BPE model remembers the merges of every pre-tokenized "word" it has seen, up to 10,000 of them, and never
# evicts one. Where the pre-tokenizer does not split (InternLM2's has none, SentencePiece conversions may keep the text
# whole), the words are whole captions, which never repeat: caching them only costs memory, ~3 KB each, filled in
# every data-loader worker (the length count's batch calls leave the cache nearly empty before the fork): 10,000
# entries grew each worker by ~30 MB over its first ~2,000 images, 1,024 by ~3 MB. 64 leave room for the pieces that do
# repeat (the template's and the question's; encoding speed unchanged); tokenizers that split into real words keep
# their default cache.
BPE_CACHE_ENTRIES = 64


def load_tokenizer(path: str | Path) -> transformers.PreTrainedTokenizerBase:
    """The fast tokenizer of the model or tokenizer folder `path`."""
    folder = Path(path)
    if not folder.is_dir():
        raise CaptuneError("tokenizer folder not found", folder)
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise CaptuneError("no tokenizer files here (expected tokenizer.json or tokenizer.model)", folder)
    config = _read_config(folder)
    if _is_internlm2(folder, config):
        return _bounded_cache(_internlm2_tokenizer(folder, config))
    try:
        # An empty config: an original release's config.json (internvl_chat) is unknown to AutoConfig, which
        # would only warn about it; the tokenizer files say everything needed.
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), config=transformers.PretrainedConfig(),
                                                               trust_remote_code=False)
    except Exception as e:  # transformers raises many kinds (OSError, ValueError, KeyError...)
        raise CaptuneError(f"cannot load the tokenizer: {type(e).__name__}: {e}", folder) from None
    return _bounded_cache(tokenizer)


def _bounded_cache(tokenizer: transformers.PreTrainedTokenizerBase) -> transformers.PreTrainedTokenizerBase:
    """The tokenizer with its BPE cache limited to `BPE_CACHE_ENTRIES` if it caches whole texts (unchanged otherwise,
    and with a tokenizers release without `_resize_cache`, the binding's only way to set it after loading)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    resize = getattr(getattr(backend, "model", None), "_resize_cache", None)
    if resize is None:
        return tokenizer
    pre = backend.pre_tokenizer
    if pre is None or len(pre.pre_tokenize_str("a caption")) == 1:
        resize(BPE_CACHE_ENTRIES)
    return tokenizer


def image_token_ids(tokenizer: transformers.PreTrainedTokenizerBase) -> dict[str, int]:
    """Ids of `<img>`, `</img>` and `<IMG_CONTEXT>`, keyed by the token string."""
    return {token: token_id(tokenizer, token) for token in IMAGE_TOKENS}


def _read_config(folder: Path) -> dict[str, Any]:
    file = folder / "tokenizer_config.json"
    if not file.is_file():
        return {}
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CaptuneError(f"cannot read tokenizer_config.json: {e}", file) from None
    if not isinstance(config, dict):
        raise CaptuneError("tokenizer_config.json is not a JSON object", file)
    return config


def _is_internlm2(folder: Path, config: dict[str, Any]) -> bool:
    if (folder / "tokenizer.json").is_file() or not (folder / "tokenizer.model").is_file():
        return False
    auto_map = config.get("auto_map") or {}
    targets = json.dumps(auto_map) if isinstance(auto_map, (dict, list)) else str(auto_map)
    named = str(config.get("tokenizer_class", "")).startswith("InternLM2Tokenizer")
    return named or "tokenization_internlm2" in targets


def _internlm2_tokenizer(folder: Path, config: dict[str, Any]) -> transformers.PreTrainedTokenizerFast:
    proto = _read_proto(folder / "tokenizer.model")
    added = _added_tokens(config, folder)
    backend = _sentencepiece_bpe(proto, added, folder / "tokenizer.model")

    bos = _token_str(config.get("bos_token", "<s>"))
    eos = _token_str(config.get("eos_token", "</s>"))
    unk = _token_str(config.get("unk_token", "<unk>"))
    pad = _token_str(config.get("pad_token")) or eos
    for token in (bos, eos, unk, pad):
        if backend.token_to_id(token) is None:
            raise CaptuneError(f"special token {token!r} is not in tokenizer.model", folder)
    add_bos, add_eos = bool(config.get("add_bos_token", True)), bool(config.get("add_eos_token", False))
    # As InternLM2Tokenizer.build_inputs_with_special_tokens: [bos] A [B] [eos].
    single = " ".join([f"{bos}:0"] * add_bos + ["$A:0"] + [f"{eos}:0"] * add_eos)
    pair = " ".join([f"{bos}:0"] * add_bos + ["$A:0", "$B:1"] + [f"{eos}:1"] * add_eos)
    backend.post_processor = processors.TemplateProcessing(
        single=single, pair=pair,
        special_tokens=[(bos, backend.token_to_id(bos)), (eos, backend.token_to_id(eos))])

    kwargs: dict[str, Any] = {}
    if isinstance(config.get("model_max_length"), int):
        kwargs["model_max_length"] = config["model_max_length"]
    extra = [_token_str(t) for t in config.get("additional_special_tokens") or []]
    if extra:
        kwargs["additional_special_tokens"] = extra
    # add_bos_token/add_eos_token are deliberately not passed: transformers would then rebuild the post-processor
    # itself, and how it does so differs between versions. Clean-up on: InternLM2Tokenizer.convert_tokens_to_string
    # cleans up tokenization spaces whatever its config says (captune's `decode_ids` does it; the flag is saved with
    # the tokenizer, so converted and merged folders decode the same).
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=bos, eos_token=eos, unk_token=unk, pad_token=pad,
        clean_up_tokenization_spaces=True, padding_side=config.get("padding_side", "right"), **kwargs)


def _read_proto(file: Path) -> Any:
    try:
        importlib.import_module("sentencepiece")
        model_pb2 = importlib.import_module("sentencepiece.sentencepiece_model_pb2")
    except ImportError as e:
        raise CaptuneError(
            f"reading InternLM2's tokenizer.model needs the sentencepiece and protobuf packages ({e}); "
            "run: pip install sentencepiece protobuf") from None
    proto = model_pb2.ModelProto()
    try:
        proto.ParseFromString(file.read_bytes())
    except Exception as e:  # protobuf's DecodeError, or OSError
        raise CaptuneError(f"not a SentencePiece model: {e}", file) from None
    if not proto.pieces:
        raise CaptuneError("not a SentencePiece model (no pieces)", file)
    return proto


def _added_tokens(config: dict[str, Any], folder: Path) -> dict[int, AddedToken]:
    """tokenizer_config.json's `added_tokens_decoder` as {id: AddedToken}."""
    added = {}
    for key, entry in (config.get("added_tokens_decoder") or {}).items():
        try:
            content = entry["content"] if isinstance(entry, dict) else str(entry)
            flags = entry if isinstance(entry, dict) else {}
            added[int(key)] = AddedToken(
                content, special=bool(flags.get("special", True)), normalized=bool(flags.get("normalized", False)),
                lstrip=bool(flags.get("lstrip", False)), rstrip=bool(flags.get("rstrip", False)),
                single_word=bool(flags.get("single_word", False)))
        except (KeyError, TypeError, ValueError):
            file = folder / "tokenizer_config.json"
            raise CaptuneError(f"malformed added_tokens_decoder entry {key!r}", file) from None
    return added


def _token_str(token: Any) -> str | None:
    if isinstance(token, dict):  # serialized AddedToken
        return token.get("content")
    return token


# SentencePiece decodes a run of byte pieces character by character (U+FFFD for each byte that starts no well-formed
# character), tokenizers' ByteFallback the whole run at once (U+FFFD for every byte of a run that is not valid UTF-8):
# `<0x0B><0xD6>` is "\x0b\ufffd" for the original, "\ufffd\ufffd" for ByteFallback alone. Both agree on a run that is
# valid UTF-8 or has no valid character at all. An ASCII byte is always a character of its own and a never-valid byte
# (C0, C1, F5-FF) always one U+FFFD, so both end a run for SentencePiece. These decoder steps make them do so for
# ByteFallback too: never-valid bytes become U+FFFD; ASCII bytes are disguised as `<0x+41>` (not a byte token), so that
# the first ByteFallback decodes the runs between them, then restored for a second ByteFallback of their own. What no
# tokenizers decoder can express (its steps see one token at a time or all of them fused) is a run of other bytes
# mixing whole multi-byte characters with invalid bytes ("é" then a lone <0x80>): ByteFallback gives U+FFFD for each of
# its bytes. captune's own decoding (`inputs.processor.decode_ids`) gives SentencePiece's text for those too; a
# tokenizer saved by captune and loaded without captune keeps only this limitation.
_DISGUISED = re.compile(r"<0x\+[0-7][0-9A-F]>")
_BYTE_RUN_SPLITS = [
    decoders.Replace(Regex(r"\A<0x(?:C[01]|F[5-9A-F])>\z"), "\ufffd"),
    decoders.Replace(Regex(r"\A<0x(?=[0-7][0-9A-F]>\z)"), "<0x+"),
    decoders.ByteFallback(),
    decoders.Replace(Regex(r"\A<0x\+(?=[0-7][0-9A-F]>\z)"), "<0x"),
]


def _sentencepiece_bpe(proto: Any, added: dict[int, AddedToken], source: Path) -> Tokenizer:
    """A `tokenizers.Tokenizer` that segments exactly like SentencePiece's BPE model `proto`.

    `added` ({id: AddedToken}) names tokens by id: an id inside the proto renames that piece (InternLM2's
    `[UNUSED_TOKEN_145]` is the release's `<|im_end|>`), an id past it extends the vocabulary. All of them become
    added tokens with exactly those ids. The proto's other USER_DEFINED pieces stay plain (non-special) added tokens,
    matched before BPE as SentencePiece does.
    """
    spec, trainer = proto.normalizer_spec, proto.trainer_spec
    unsupported = []
    if trainer.model_type != 2:  # BPE
        unsupported.append(f"model_type {trainer.model_type} (only BPE)")
    if spec.precompiled_charsmap:
        unsupported.append(f"normalization {spec.name!r}")
    if spec.add_dummy_prefix or spec.remove_extra_whitespaces or trainer.treat_whitespace_as_suffix:
        unsupported.append("add_dummy_prefix/remove_extra_whitespaces/treat_whitespace_as_suffix")
    if unsupported:
        raise CaptuneError("captune reproduces InternLM2's SentencePiece settings only; this model has "
                           + ", ".join(unsupported), source)

    pieces = proto.pieces
    vocab = {}
    for i, piece in enumerate(pieces):
        vocab[added[i].content if i in added else piece.piece] = i
    for i in sorted(added):
        if i >= len(pieces):
            vocab[added[i].content] = i
    if len(vocab) != len(pieces) + sum(i >= len(pieces) for i in added):
        raise CaptuneError("tokenizer_config.json's added_tokens_decoder gives one token string two ids", source)

    # SentencePiece merges, at each step, the adjacent pair whose concatenation is the highest-scored piece.
    normal = {p.piece for p in pieces if p.type == _NORMAL}
    ranked = []
    for i, piece in enumerate(pieces):
        if piece.type == _NORMAL and i not in added:
            text = piece.piece
            ranked += [(-piece.score, i, text[:k], text[k:]) for k in range(1, len(text))
                       if text[:k] in normal and text[k:] in normal]
    ranked.sort()
    merges = [(left, right) for _, _, left, right in ranked]

    unk = next((name for name, i in vocab.items() if i == trainer.unk_id), None)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk,
                                     byte_fallback=trainer.byte_fallback, fuse_unk=True))
    if spec.escape_whitespaces:
        tokenizer.normalizer = normalizers.Replace(" ", "▁")
    steps = [decoders.Replace("▁", " ")] if spec.escape_whitespaces else []
    if trainer.byte_fallback and not any(_DISGUISED.fullmatch(token) for token in vocab):
        steps += _BYTE_RUN_SPLITS
    tokenizer.decoder = decoders.Sequence(steps + [decoders.ByteFallback(), decoders.Fuse()])

    named = [added[i] for i in sorted(added)]
    tokenizer.add_special_tokens([t for t in named if t.special])
    tokenizer.add_tokens([t for t in named if not t.special])
    tokenizer.add_tokens([AddedToken(p.piece, normalized=False, special=False)
                          for i, p in enumerate(pieces) if p.type == _USER_DEFINED and i not in added])
    for i, token in added.items():
        if tokenizer.token_to_id(token.content) != i:
            raise CaptuneError(f"added token {token.content!r} could not keep its id {i}", source)
    return tokenizer
