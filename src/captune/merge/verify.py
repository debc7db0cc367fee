"""Checking a merge exactly: the float32 merge against the base with the adapter applied by PEFT (logits), every written
weight against that merge rounded to the output dtype (bit for bit), each written folder loaded afresh; what the
rounding changes is reported beside what rounding the base model changes."""

from __future__ import annotations

import gc
import math
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from captune.devices import dtype_name
from captune.errors import CaptuneError
from captune.inputs.tiling import normalize
from captune.internvl.folder import (
    Checkpoint,
    iter_shard,
    open_checkpoint,
)
from captune.internvl.load import processor_for
from captune.internvl.lora import (
    is_adapter_folder,
)
from captune.merge.adapter import (
    Adapter,
    adapter_subset,
    base_tokenizer,
    open_base,
    original_config,
    read_adapter,
)
from captune.merge.depth import check_depth, first_layers
from captune.merge.weights import (
    CHECK_DTYPE,
    compare_streamed,
    compare_weights,
    dtype_step,
)

PROBE_POSITIONS = 32
TOLERANCE = 1e-5
NOISE_MARGIN = 10.0
# The rounding of a bf16/fp16 output is reported, not refused; a note suggests --dtype fp32 when it moves the logits
# more than ROUNDING_NOTE x what one rounding of the base's weights moves them, plus ROUNDING_NOTE_FLOOR.
ROUNDING_NOTE = 3.0
ROUNDING_NOTE_FLOOR = 1e-4
# --------------------------------------------------------------------------------------------- the check


def relative_error(reference: torch.Tensor, other: torch.Tensor) -> float:
    return ((other.double() - reference.double()).norm() / reference.double().norm().clamp_min(1e-30)).item()


@dataclass
class Probe:
    """One input for both sides of the check: the caption prompt and a synthetic 448px tile."""

    input_ids: torch.Tensor  # [1, T]
    pixel_values: torch.Tensor  # [1, 3, S, S] float32
    image_token_id: int


def _probe_image():
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:448, 0:448]
    pixels = np.stack([x * 255 // 447, y * 255 // 447, (x + y) * 255 // 894], axis=-1)
    pixels = (pixels + rng.integers(-24, 25, pixels.shape)).clip(0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def make_probe(ckpt: Checkpoint, tokenizer) -> Probe:
    """With a tokenizer, the processor's caption prompt; without, image tokens (id: the last of the vocabulary,
    as `<IMG_CONTEXT>` is unknown) and a few text ids."""
    from captune.inputs.processor import DEFAULT_QUESTION
    from captune.inputs.tiling import tile_image
    from captune.internvl.config import num_image_tokens_per_tile

    image = _probe_image()
    if tokenizer is not None:
        from captune.internvl.tokenizer import image_token_ids

        sample = processor_for(ckpt, tokenizer).prepare(image, DEFAULT_QUESTION, max_tiles=1)
        return Probe(torch.tensor([sample["input_ids"]]), sample["pixel_values"],
                     image_token_ids(tokenizer)["<IMG_CONTEXT>"])
    cfg = original_config(ckpt)
    image_id = int(cfg["llm_config"]["vocab_size"]) - 1
    size = cfg.get("force_image_size") or cfg["vision_config"].get("image_size", 448)
    ids = [1] + [image_id] * num_image_tokens_per_tile(cfg) + list(range(3, 19))
    return Probe(torch.tensor([ids]), tile_image(image, max_tiles=1, tile_size=size, thumbnail=False), image_id)


def load_model(path: Path, image_token_id: int, device, layers: int | None = None) -> torch.nn.Module:
    """A checkpoint (either layout) in float32, without its tokenizer (the probe brings its own ids); with `layers`,
    depth-reduced: only the LLM's first `layers` layers (the rest of the checkpoint is passed over)."""
    from captune.internvl.load import (
        empty_model,
        load_native,
        load_original,
        stream_weights,
    )

    ckpt = open_checkpoint(path)
    if layers is not None:
        model = empty_model(ckpt, "sdpa", image_token_id, text_layers=layers)
        stream_weights(model, ckpt, CHECK_DTYPE, lambda _name: device, first_layers(layers))
        return model.eval()
    load = load_original if ckpt.layout == "internvl" else load_native
    return load(ckpt, CHECK_DTYPE, device, "sdpa", image_token_id).eval()


@torch.no_grad()
def probe_logits(model: torch.nn.Module, probe: Probe) -> torch.Tensor:
    device = next(model.parameters()).device
    # The last positions see the whole prompt, image included: every merged layer shows in their logits.
    logits = model(input_ids=probe.input_ids.to(device), pixel_values=normalize(probe.pixel_values.to(device)).to(CHECK_DTYPE),
                   logits_to_keep=PROBE_POSITIONS).logits  # [1, PROBE_POSITIONS, V]
    return logits.float().cpu()


def merged_logits(path: Path, probe: Probe, device, layers: int | None = None) -> torch.Tensor:
    """The probe logits of a model folder, loaded afresh in float32 (depth-reduced with `layers`)."""
    return probe_logits(load_model(path, probe.image_token_id, device, layers), probe)


def adapter_logits(model: torch.nn.Module, adapter: Adapter, probe: Probe,
                   folder: Path | None = None) -> tuple[torch.Tensor, torch.nn.Module]:
    """The reference: `model` (the base, float32) with the adapter (in `folder`, default its own) applied by PEFT,
    unmerged; and `model` back without it (PEFT only wraps the base's layers: their weights are left as they were)."""
    from peft import PeftModel

    try:
        peft = PeftModel.from_pretrained(model, str(folder or adapter.path))
    except (ValueError, KeyError, RuntimeError) as e:
        raise CaptuneError(f"adapter does not fit its base model: {e}", adapter.path) from None
    reference = probe_logits(peft.eval(), probe)
    return reference, peft.unload()


@torch.no_grad()
def merge_in_memory(model: torch.nn.Module, adapter: Adapter) -> None:
    """Fold the adapter into `model` (the base, float32, plain): each targeted weight becomes its float32 merge,
    `Adapter.merged` as the writer computes it before rounding to the output dtype."""
    params = dict(model.named_parameters())
    for key in sorted(adapter.targets):
        if key not in params:
            raise CaptuneError(f"adapter does not fit its base model: the model has no {key}", adapter.path)
        param = params[key]
        param.copy_(adapter.merged(key, param.detach().cpu(), param.dtype))


def rounding_noise(weight: torch.Tensor, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """A rounding error of `dtype` for every element of `weight` (float32): uniform within half the step between
    `dtype` numbers at that value, as rounding a more precise value makes; none where the weight is 0.

    Simulated rather than done: a bf16 release's weights are bf16 numbers already, and rounding them changes nothing.
    An error of `weight`'s own dtype (float32 on float32) is below what the weight can hold, so added to it, it would
    vanish: there it is one whole step up or down with probability 1/12, which has the same variance.
    """
    uniform = torch.rand(weight.shape, generator=generator, device=weight.device, dtype=weight.dtype)
    step = dtype_step(weight, dtype)
    if torch.finfo(dtype).eps <= torch.finfo(weight.dtype).eps:
        noise = step * torch.sign(uniform - 0.5) * (torch.rand(weight.shape, generator=generator, device=weight.device,
                                                               dtype=weight.dtype) < 1 / 12)
    else:
        noise = step * (uniform - 0.5)
    return torch.where(weight == 0, torch.zeros_like(weight), noise)


@contextmanager
def _computing_with(model: torch.nn.Module, change: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Every module computes with `change(weight)` in place of each of its own weights: made just before the
    module's forward, dropped after it. The weights stay as they are; one module's changed copies exist at a time."""
    kept: dict[torch.nn.Module, dict[str, torch.nn.Parameter]] = {}

    def before(module, _args):
        kept[module] = {n: p for n, p in module._parameters.items() if p is not None and p.is_floating_point()}
        for n, p in kept[module].items():
            module._parameters[n] = torch.nn.Parameter(change(p.detach()), requires_grad=False)

    def after(module, _args, _output):
        module._parameters.update(kept.pop(module))

    handles = []
    for module in model.modules():
        if any(p.is_floating_point() for p in module.parameters(recurse=False)):
            handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for module, params in kept.items():  # a forward that raised
            module._parameters.update(params)


@torch.no_grad()
def rounding_effect(model: torch.nn.Module, probe: Probe, dtype: torch.dtype,
                    plain: torch.Tensor | None = None) -> float:
    """How much one rounding to `dtype` of all of `model`'s weights moves its probe logits (`plain`, when known):
    their relative error, the weights computed with a simulated rounding error (`rounding_noise`), left as they are."""
    plain = probe_logits(model, probe) if plain is None else plain
    generators: dict[torch.device, torch.Generator] = {}

    def rounded(weight: torch.Tensor) -> torch.Tensor:
        if weight.device not in generators:
            generators[weight.device] = torch.Generator(weight.device).manual_seed(0)
        return weight + rounding_noise(weight, dtype, generators[weight.device])

    with _computing_with(model, rounded):
        return relative_error(plain, probe_logits(model, probe))


@dataclass
class MergeCheck:
    """What `check_merge` measured: relative errors of float32 probe logits."""

    dtype: torch.dtype  # the outputs' dtype
    merge_error: float  # the float32 merge, in memory, against the adapter applied by PEFT, unmerged
    float32_noise: float = math.nan  # one float32 rounding of the merged weights, on the merge's logits
    tolerance: float = TOLERANCE  # of merge_error and load_error: max(TOLERANCE, NOISE_MARGIN * float32_noise)
    weights: int = 0  # weights compared bit for bit in each output
    load_error: dict[str, float] = field(default_factory=dict)  # each output, loaded, vs. its weights in memory
    error: dict[str, float] = field(default_factory=dict)  # each output, loaded, vs. the adapter: the rounding's effect
    base_rounding: float | None = None  # one rounding of the base's weights to `dtype`, on the base's logits
    adapter_effect: float | None = None  # the adapter's own effect: base + adapter against the base

    @property
    def max_error(self) -> float:
        return max(self.error.values())


def check_merge(adapter: Adapter, ckpt: Checkpoint, tokenizer, outs: dict[str, Path], dtype: torch.dtype, device,
                say: Callable[[str], None], written: bool = True, layers: int | None | str = "auto") -> MergeCheck:
    """Check the outputs `outs` ({format: folder}, weights in `dtype`) of merging `adapter` into `ckpt`, exactly.

    1. The merge itself, in float32: the base with the adapter folded in, in memory, against the base with the
       adapter applied by PEFT (unmerged): probe logits within max(TOLERANCE, NOISE_MARGIN x what one float32
       rounding of the merged weights does to them). Catches a wrong scale, transposed or misplaced deltas, a missing
       layer: what `Adapter.merged` could get wrong.
    2. Every weight of every output, read back through its layout, is that float32 merge rounded to `dtype`, bit for
       bit: what the writer could get wrong (a skipped delta, a wrong name, a wrong q/k/v fusion), however small.
    3. Every output, loaded afresh, computes what those rounded weights compute in memory (same tolerance): its
       config.json and the loader.
    Then the information: each output's logits against the adapter's (for bf16/fp16, the rounding's effect, which is
    no error), beside what one rounding of the base's weights to `dtype` does to the base's logits.
    One float32 model in memory at a time; CaptuneError (ending in "nothing was written" when `written`) if off.

    A model whose float32 copy would not fit `device` (`check_depth`; `layers` "auto") is checked depth-reduced: 1 and
    3 on a model of the vision tower, the projector and the LLM's first `layers` layers (every width real; each layer
    is merged by the same rule), 2 for every weight, shard by shard (`compare_streamed`): InternVL2-76B is 305 GB in
    float32. `layers` None: the whole model.
    """
    from captune.devices import resolve_device

    suffix = "; nothing was written" if written else ""
    device = resolve_device(device)
    if layers == "auto":
        layers, why = check_depth(original_config(ckpt), device)
        if layers is not None:
            say(f"Checking on a depth-reduced model: {why}")
    probe = make_probe(ckpt, tokenizer)
    model = load_model(ckpt.path, probe.image_token_id, device, layers)
    check = MergeCheck(dtype=dtype, merge_error=math.nan)
    plain = probe_logits(model, probe) if dtype != CHECK_DTYPE else None
    if plain is not None:
        check.base_rounding = rounding_effect(model, probe, dtype, plain)
    with tempfile.TemporaryDirectory() as tmp:
        part = adapter if layers is None else adapter_subset(adapter, first_layers(layers), Path(tmp))
        reference, model = adapter_logits(model, part, probe, None if layers is None else Path(tmp))
    if plain is not None:
        check.adapter_effect = relative_error(plain, reference)
    merge_in_memory(model, part)
    merged = probe_logits(model, probe)
    check.float32_noise = rounding_effect(model, probe, CHECK_DTYPE, merged)
    check.tolerance = tol = max(TOLERANCE, NOISE_MARGIN * check.float32_noise)
    check.merge_error = err = relative_error(reference, merged)
    say(f"Checked the merge in float32: relative error of its logits against the adapter's (PEFT, unmerged) "
        f"{err:.2e} (tolerance {tol:.1e}; float32's own rounding moves them by {check.float32_noise:.1e})")
    if not err <= tol:
        raise CaptuneError(f"the merge differs from the adapter: relative error of the float32-merged logits {err:.3g} "
                           f"is above the tolerance {tol:.2g} (a wrong merge, not rounding){suffix}", adapter.path)
    for fmt, folder in outs.items():  # errors name the adapter when the folder is a temporary one, gone with them
        where = adapter.path if written else None
        check.weights = (compare_weights(model, folder, dtype, fmt, suffix, where) if layers is None
                         else compare_streamed(ckpt, adapter, folder, dtype, fmt, suffix, where))
    with torch.no_grad():
        for param in model.parameters():
            if param.is_floating_point():
                param.copy_(param.to(dtype))  # the output's weights, in float32
    rounded = merged if dtype == CHECK_DTYPE else probe_logits(model, probe)
    del model  # one model in memory at a time
    gc.collect()
    what = "the float32 merge" + ("" if dtype == CHECK_DTYPE else f" rounded to {dtype_name(dtype)}")
    for fmt, folder in outs.items():
        logits = merged_logits(folder, probe, device, layers)
        check.load_error[fmt] = load_err = relative_error(rounded, logits)
        if not load_err <= tol:
            raise CaptuneError(f"the merged model ({fmt}) does not load as the merge: its logits are {load_err:.3g} "
                               f"off those of its own weights in memory (tolerance {tol:.2g}); its config.json?"
                               f"{suffix}", adapter.path if written else folder)
        check.error[fmt] = err = relative_error(reference, logits)
        loads = "it loads" if layers is None else f"its vision tower, projector and first {layers} LLM layers load"
        text = (f"Checked the {fmt} output: its {check.weights} weights are {what}, bit for bit, and {loads} as that "
                "model")
        if check.base_rounding is None:
            say(f"{text} (relative error of its logits against the adapter's {err:.2e})")
        else:
            say(text)
            say(_rounding_note(fmt, err, check))
    return check


def _rounding_note(fmt: str, err: float, check: MergeCheck) -> str:
    """The rounding's effect, beside the base's own and the adapter's; a hint at fp32 when it is well above the base's
    (a LoRA change much smaller than a bf16 step is rounded away, a much larger one rounded coarser)."""
    name, base, effect = dtype_name(check.dtype), check.base_rounding, check.adapter_effect
    text = (f"{name} rounding (information, not an error): the {fmt} output's logits are {err:.2e} off the adapter's; "
            f"rounding the base model to {name} moves its logits {base:.2e}, the adapter moves them {effect:.2e}")
    if err > ROUNDING_NOTE * base + ROUNDING_NOTE_FLOOR:
        text += (f"; the merge loses {err / max(base, 1e-30):.1f}x as much to rounding as the base: --dtype fp32 keeps "
                 "the adapter's logits")
    return text


def stored_dtype(ckpt: Checkpoint) -> torch.dtype:
    """The dtype of a checkpoint's floating-point weights (from the first shard)."""
    for _key, tensor in iter_shard(ckpt.shards[0]):
        if tensor.is_floating_point():
            return tensor.dtype
    raise CaptuneError("no floating-point weights", ckpt.shards[0])


def _merged_folders(merged: Path) -> list[Path]:
    """MERGED itself, or its hf/ and internvl/ folders (a `--format both` output)."""
    if not (merged / "config.json").is_file():
        both = [merged / fmt for fmt in ("hf", "internvl") if (merged / fmt / "config.json").is_file()]
        if both:
            return both
    if is_adapter_folder(merged):
        raise CaptuneError("is a LoRA adapter, not a merged model", merged)
    return [merged]


def verify_merge(adapter: str | Path, merged: str | Path, base: str | Path | None = None,
                 device: str = "auto", log: Callable[[str], None] | None = None) -> float:
    """Check MERGED as `captune merge` checks its output (`check_merge`), whatever wrote it: CaptuneError if it is not
    ADAPTER merged into its base (rounded to MERGED's dtype). `log` receives the lines `check_merge` says.

    Returns the relative error of MERGED's logits against ADAPTER's (applied to its base by PEFT, unmerged), float32:
    ~1e-7 for a float32 merge, the rounding's effect for bf16 (no error). A `--format both` output is checked in both
    layouts and the larger error returned.
    """
    lora = read_adapter(adapter)
    ckpt = open_base(lora, base)
    outs = {open_checkpoint(folder).layout: folder for folder in _merged_folders(Path(merged))}
    dtypes = {stored_dtype(open_checkpoint(folder)) for folder in outs.values()}
    if len(dtypes) > 1:
        raise CaptuneError(f"its folders hold different dtypes ({', '.join(sorted(map(dtype_name, dtypes)))})", merged)
    check = check_merge(lora, ckpt, base_tokenizer(ckpt, warn=False), outs, dtypes.pop(), device,
                        log or (lambda _msg: None), written=False)
    return check.max_error
