"""The swap that puts the prompt's compiled regions in place: everything is as it was afterwards, also after an
error, and an attribute the object had of its own is put back, not removed."""

from __future__ import annotations

import types

import pytest
import torch

from captune.eval.compiled import replaced


def test_replaced_puts_everything_back_after_an_error():
    plain, hooked = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    own = hooked.forward = lambda x: "own"
    namespace = types.ModuleType("modelling")
    namespace.rotary = original = lambda q: q
    with pytest.raises(RuntimeError), replaced([(plain, "forward", lambda x: "a"), (hooked, "forward", lambda x: "b"),
                                                (namespace, "rotary", lambda q: -q)]):
        assert plain(1) == "a" and hooked(1) == "b" and namespace.rotary(1) == -1
        raise RuntimeError("out of memory")
    assert "forward" not in vars(plain)  # its class's forward again
    assert hooked.forward is own and hooked(1) == "own"  # a forward set on the module (accelerate's hooks) again
    assert namespace.rotary is original
