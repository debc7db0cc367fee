"""Every weight a merge wrote, read back through its output's layout, against the float32 merge rounded to the output
dtype, bit for bit: against a merged model in memory (`compare_weights`), or shard by shard against the base and the
adapter, with no model at all (`compare_streamed`: models larger than memory)."""

from __future__ import annotations

from pathlib import Path

import torch

from captune.devices import dtype_name
from captune.errors import CaptuneError
from captune.internvl.folder import Checkpoint, open_checkpoint
from captune.internvl.keys import KeyMap, iter_model_tensors, model_tensor_names
from captune.merge.adapter import Adapter, original_config

CHECK_DTYPE = torch.float32


def dtype_step(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The step between consecutive `dtype` numbers at each value of `x` (float32): its last bit's worth."""
    info = torch.finfo(dtype)
    exponent = torch.frexp(x)[1]  # x = m * 2**exponent, 0.5 <= |m| < 1: the step there is eps * 2**(exponent - 1)
    return torch.ldexp(torch.full_like(x, info.eps), exponent - 1).clamp_min(info.eps * info.tiny)


class WeightCheck:
    """Written tensors against expected ones (the float32 merge rounded to `dtype`), collected, then judged once."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self.compared: list[str] = []
        self.differ: list[str] = []
        self.overflow: list[str] = []
        self.steps = 0.0  # the largest difference of a differing weight, in steps of `dtype`

    def compare(self, name: str, expected: torch.Tensor, tensor: torch.Tensor) -> None:
        self.compared.append(name)
        if expected.is_floating_point() and not bool(expected.isfinite().all()):
            self.overflow.append(name)
        if tensor.dtype == expected.dtype and torch.equal(tensor, expected):
            return
        self.differ.append(name)
        if tensor.shape == expected.shape and tensor.is_floating_point() and expected.is_floating_point():
            diff = (tensor.float() - expected.float()).abs() / dtype_step(expected.float(), self.dtype)
            self.steps = max(self.steps, diff.max().item())

    def judge(self, fmt: str, suffix: str, where: Path) -> int:
        """How many weights were compared; CaptuneError naming `where` if one was off."""
        name = dtype_name(self.dtype)
        if self.overflow:
            raise CaptuneError(f"the merge does not fit {name}: {len(self.overflow)} merged weights exceed its range "
                               f"({some(self.overflow)}); merge with --dtype bf16 or fp32{suffix}", where)
        if self.differ:
            rounded = "" if self.dtype == CHECK_DTYPE else f" rounded to {name}"
            by = f" by up to {self.steps:.3g} steps of {name}" if self.steps else ""
            raise CaptuneError(f"the merged model ({fmt}) is not the float32 merge{rounded}: {len(self.differ)} of "
                               f"{len(self.compared)} weights differ{by} ({some(self.differ)}); a wrong merge, not "
                               f"rounding (captune merge rounds the float32 merge once){suffix}", where)
        return len(self.compared)


def some(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def compare_weights(model: torch.nn.Module, folder: Path, dtype: torch.dtype, fmt: str, suffix: str = "",
                    where: Path | None = None) -> int:
    """Every weight of an output folder, read back through its own layout (names, fused q/k/v), must be `model`'s
    (the float32 merge) rounded to `dtype`, bit for bit. Returns how many weights were compared; errors name `where`
    (default: the folder)."""
    from captune.internvl.load import fill_weights

    check = WeightCheck(dtype)

    def compare(name: str, param: torch.nn.Parameter, tensor: torch.Tensor) -> None:
        value = param.detach()
        check.compare(name, value.to(dtype).cpu() if value.is_floating_point() else value.cpu(), tensor)

    try:
        fill_weights(model, open_checkpoint(folder), compare)
    except CaptuneError as e:
        raise CaptuneError(f"the merged model ({fmt}) does not hold the base model's weights: {e}{suffix}",
                           where or folder) from None
    return check.judge(fmt, suffix, where or folder)


def compare_streamed(ckpt: Checkpoint, adapter: Adapter, folder: Path, dtype: torch.dtype, fmt: str,
                     suffix: str = "", where: Path | None = None) -> int:
    """`compare_weights` without a model: the output's tensors, shard by shard, against the base's merged with
    `adapter` in float32 (`Adapter.merged`, as `merge_in_memory` computes them) and rounded to `dtype`. The output must
    keep the base's sharding, as `captune merge` writes it: memory is then about one shard of each."""
    where = where or folder
    base_keymap = KeyMap(original_config(ckpt))
    names = [model_tensor_names(ckpt, shard, base_keymap) for shard in ckpt.shards]  # from the headers alone
    known, ahead = {name for shard in names for name in shard}, 2 * max(map(len, names))
    base = ((key, tensor) for shard in ckpt.shards for key, tensor in iter_model_tensors(ckpt, shard, base_keymap))
    out = open_checkpoint(folder)
    out_keymap = KeyMap(out.config) if out.layout == "internvl" else None
    check, expected, seen = WeightCheck(dtype), {}, set()
    try:
        for shard in out.shards:
            for key, tensor in iter_model_tensors(out, shard, out_keymap):
                if key not in known or key in seen:
                    raise CaptuneError(f"it has {key!r} " + ("twice" if key in seen else "which the base has not"))
                while key not in expected:  # the base's tensors up to this one (the shards come in the same order)
                    if len(expected) > ahead:
                        raise CaptuneError("its shards do not follow the base's, as captune merge writes them: check "
                                           "it on a device that holds the model in float32 (--device)")
                    name, value = next(base)
                    expected[name] = adapter.merged(name, value, dtype)  # the float32 merge, rounded once to dtype
                check.compare(key, expected.pop(key), tensor)
                seen.add(key)
        missing = sorted(known - seen)
        if missing:
            raise CaptuneError(f"it lacks {some(missing)}")
    except CaptuneError as e:
        raise CaptuneError(f"the merged model ({fmt}) does not hold the base model's weights: {e}{suffix}",
                           where) from None
    return check.judge(fmt, suffix, where)
