"""The prompt's compiled regions: the repeated blocks of an InternVL model that `eval/greedy.py` runs through
torch.compile, and the swap that puts them in place for the duration of a prompt."""

from __future__ import annotations

import contextlib
import sys
import types

import torch

_MISSING = object()


@contextlib.contextmanager
def replaced(replacements: list):
    """Each (object, attribute, value): the object's own attribute set to value for the duration, then put back as
    it was (removed if the object had none of its own: a module's forward then is its class's again)."""
    before = [(obj, name, vars(obj).get(name, _MISSING)) for obj, name, _ in replacements]
    for obj, name, value in replacements:
        setattr(obj, name, value)
    try:
        yield
    finally:
        for obj, name, value in reversed(before):
            if value is _MISSING:
                delattr(obj, name)
            else:
                setattr(obj, name, value)


def compiled_regions(model) -> list[tuple[object, str, object]]:
    """(object, attribute, compiled function) for the prompt's repeated work without side effects: the forwards of
    the vision tower's layers and of the LLM's norms and MLPs, and the rotary embedding function that the LLM's
    attention layers call from their modelling module. Each compiled once for the whole process and shared by all
    layers (regional compilation: a layer's graph instead of a whole tower's, so compiling takes seconds, not
    minutes). The rest of the LLM's attention, which writes the cache, stays eager. The rotary function is swapped
    in its module for the whole process while a prompt runs: one decoder's prompt at a time."""
    vision, llm = model.model.vision_tower, model.model.language_model
    modules = [m for m in vision.modules() if type(m).__name__.endswith("VisionLayer")]
    modules += [m for m in llm.modules() if type(m).__name__.endswith(("RMSNorm", "MLP"))]
    out = [(m, "forward", types.MethodType(_compiled(type(m).forward), m)) for m in modules]
    namespaces = {sys.modules[type(m).__module__] for m in llm.modules() if type(m).__name__.endswith("Attention")}
    for namespace in namespaces:
        rotary = getattr(namespace, "apply_rotary_pos_emb", None)  # looked up by name at every call
        if callable(rotary):
            out.append((namespace, "apply_rotary_pos_emb", _compiled(rotary)))
    return out


def _compiled(fn):
    """`fn` through torch.compile, once per process, so that later decoders (in-training evaluations, the
    benchmark's runs) reuse its compiled code (torch.compile called again compiles again). Automatic dynamic shapes:
    compiled for the first shapes, again with the sizes that changed symbolic, and once more for a batch of one
    (a size of 1 is always specialised): up to ~4 versions per function in an evaluation."""
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=None)
    return _COMPILED[fn]


_COMPILED: dict = {}
