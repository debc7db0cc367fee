"""Reading checkpoint folders: the original InternVL2 release layout or transformers' native one.

Weights are streamed tensor by tensor from memory-mapped shards, so that a 143 GB release (InternVL2-76B)
is never held twice in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from captune.errors import CaptuneError
from captune.fileio import read_json

Layout = Literal["internvl", "hf"]

ORIGINAL_ARCHITECTURE = "InternVLChatModel"
NATIVE_ARCHITECTURE = "InternVLForConditionalGeneration"
# The original config of a release, kept beside a converted native config.json so that converting back is exact
# and the processor (template, tiling) knows the release's settings.
INTERNVL_CONFIG_NAME = "internvl_config.json"

_INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_SINGLE_NAMES = ("model.safetensors", "pytorch_model.bin")


@dataclass
class Checkpoint:
    """A checkpoint folder: its config.json, layout and weight shards (in the order they are stored)."""

    path: Path
    config: dict
    layout: Layout
    shards: list[Path]
    index_name: str | None  # the shard index file, when the weights are sharded

    @property
    def internvl_config(self) -> dict | None:
        """The original InternVL config: config.json itself, or the copy kept beside a converted folder."""
        if self.layout == "internvl":
            return self.config
        kept = self.path / INTERNVL_CONFIG_NAME
        return read_json(kept) if kept.is_file() else None


def detect_layout(config: dict, config_path: Path) -> Layout:
    architectures = config.get("architectures") or []
    if ORIGINAL_ARCHITECTURE in architectures or config.get("model_type") == "internvl_chat":
        return "internvl"
    if NATIVE_ARCHITECTURE in architectures or config.get("model_type") == "internvl":
        return "hf"
    model_type = config.get("model_type")
    found = (f"architectures {', '.join(architectures)}" if architectures else
             f"model_type {model_type!r}" if model_type else "neither architectures nor model_type")
    raise CaptuneError(
        f"not an InternVL checkpoint: config.json names {found}, expected {ORIGINAL_ARCHITECTURE} "
        f"(an original InternVL2 release) or {NATIVE_ARCHITECTURE} (transformers' native layout)",
        config_path,
    )


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Validate a checkpoint folder and list its shards; every problem is one CaptuneError naming the file."""
    path = Path(path)
    if not path.exists():
        raise CaptuneError("no such folder", path)
    if not path.is_dir():
        raise CaptuneError("not a folder (expected a checkpoint folder with config.json)", path)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise CaptuneError("no config.json: not a checkpoint folder", path)
    config = read_json(config_path)
    if not isinstance(config, dict):
        raise CaptuneError("config.json is not a JSON object", config_path)
    layout = detect_layout(config, config_path)
    shards, index_name = _find_shards(path)
    return Checkpoint(path=path, config=config, layout=layout, shards=shards, index_name=index_name)


def _find_shards(path: Path) -> tuple[list[Path], str | None]:
    for name in _INDEX_NAMES:
        index_path = path / name
        if index_path.is_file():
            index = read_json(index_path)
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict) or not weight_map:
                raise CaptuneError("has no weight_map", index_path)
            shards = [path / f for f in dict.fromkeys(sorted(weight_map.values()))]
            for shard in shards:
                if not shard.is_file():
                    raise CaptuneError(f"missing shard {shard.name} (listed in {name})", path)
            return shards, name
    for name in _SINGLE_NAMES:
        if (path / name).is_file():
            return [path / name], None
    raise CaptuneError("no weights: expected model.safetensors or model.safetensors.index.json", path)


def shard_keys(shard: Path) -> list[str]:
    if shard.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(shard, framework="pt") as f:
                return list(f.keys())
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise CaptuneError(f"cannot read safetensors shard: {e}", shard) from None
    return list(_torch_load(shard).keys())


def iter_shard(shard: Path, wanted: Callable[[str], bool] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) one at a time, in the order stored; with `wanted`, only the names it accepts (the others
    are not read, from a safetensors shard)."""
    if shard.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(shard, framework="pt") as f:
                for key in f.keys():
                    if wanted is None or wanted(key):
                        yield key, f.get_tensor(key)
        except CaptuneError:
            raise
        except Exception as e:
            raise CaptuneError(f"cannot read safetensors shard: {e}", shard) from None
    else:
        yield from ((k, v) for k, v in _torch_load(shard).items() if wanted is None or wanted(k))


def _torch_load(shard: Path) -> dict[str, torch.Tensor]:
    try:
        # mmap: tensors stay on disk until used; weights_only: a checkpoint is data, never code.
        return torch.load(shard, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:
        raise CaptuneError(f"cannot read PyTorch shard: {e}", shard) from None


def shard_metadata(shard: Path) -> dict[str, str] | None:
    if shard.suffix != ".safetensors":
        return None
    from safetensors import safe_open

    with safe_open(shard, framework="pt") as f:
        return f.metadata()


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def has_tokenizer(path: Path) -> bool:
    return any((Path(path) / name).is_file() for name in TOKENIZER_FILES)
