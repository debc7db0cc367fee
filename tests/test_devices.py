"""Device names checked up front, the same in every command (`check_device`), and as one line when they are wrong."""

from __future__ import annotations

import pytest
import torch

from captune import devices
from captune.devices import check_device, resolve_device
from captune.errors import CaptuneError


@pytest.fixture
def gpus(monkeypatch):
    """Pretend this machine has N CUDA GPUs (none by default)."""
    def have(n: int) -> None:
        monkeypatch.setattr(devices.torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(devices.torch.cuda, "device_count", lambda: n)

    have(0)
    return have


@pytest.mark.parametrize("name", ["cpux", "gpu", "cuda:x", "", "mps", "meta", " cpu"])
def test_an_unknown_device_is_one_line_naming_the_option(name):
    with pytest.raises(CaptuneError) as error:
        check_device(name)
    assert str(error.value) == f"--device must be auto, cpu, cuda or cuda:N, not {name!r}"


def test_the_option_is_named_as_the_command_spells_it():
    with pytest.raises(CaptuneError, match="^--eval-device must be"):
        check_device("cpux", option="--eval-device")


def test_cuda_without_a_gpu(gpus):
    for name in ("cuda", "cuda:0"):
        with pytest.raises(CaptuneError, match=f"^--device {name}: no CUDA GPU is available"):
            check_device(name)
    assert check_device("auto") == "auto" and check_device(None) == "auto" and check_device("cpu") == "cpu"


def test_a_gpu_index_beyond_the_machines(gpus):
    gpus(2)
    assert check_device("cuda") == "cuda" and check_device("cuda:1") == "cuda:1"
    with pytest.raises(CaptuneError, match=r"^--device cuda:2: this machine has 2 GPU\(s\), cuda:0 to cuda:1$"):
        check_device("cuda:2")


def test_resolve_device_says_a_bad_name_in_one_line_and_keeps_meta():
    with pytest.raises(CaptuneError, match="^--device must be auto, cpu, cuda or cuda:N, not 'cpux'$"):
        resolve_device("cpux")
    assert resolve_device("meta") == torch.device("meta")  # models without weights (FSDP) still work
    assert resolve_device("cpu") == torch.device("cpu")
