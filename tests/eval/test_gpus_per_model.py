"""`--gpus-per-model K` of `captune eval` and `captune caption`: which GPUs each process takes and the batch, and the
refusals, each one line and exit status 2 before anything loads or OUT exists. GPUs are faked (their count and
memory); the models are the seven releases' config-only folders (tests/internvl/releases/)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.forbid import forbid

from captune.cli import main
from captune.errors import CaptuneError
from captune.internvl import placement as L

RELEASES = Path(__file__).resolve().parents[1] / "internvl" / "releases"
SCENE = "tiling/images/scene_640x427.jpg"


def fake_gpus(monkeypatch, count: int, total: float = 80.0, free: list[float] | None = None, procs: int = 1,
              rank: int = 0) -> None:
    """`count` CUDA GPUs of `total` GB (`free[i]` GB free), seen by local rank `rank` of `procs` processes."""
    free = free or [total] * count
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(L, "gpu_memory", lambda i: (total, free[i]))
    monkeypatch.setattr(L, "card_gb", lambda i: total)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(procs))
    monkeypatch.setenv("LOCAL_RANK", str(rank))


@pytest.fixture
def nothing_loads(monkeypatch):
    """Loading the model, creating a process group or captioning would be a failure: the refusal comes first."""
    forbid(monkeypatch, ["captune.internvl.load.load", "captune.distributed.init",
                         "captune.eval.evaluate.generate_captions"], "work started before the refusal")


REFUSALS = [
    ("K over the GPUs", "InternVL2-2B", dict(count=2), ["--gpus-per-model", "4"],
     "--gpus-per-model 4: 2 GPUs are visible"),
    ("K over the GPUs from --device", "InternVL2-2B", dict(count=4), ["--gpus-per-model", "2", "--device", "cuda:3"],
     "--gpus-per-model 2: 1 GPU is visible from cuda:3"),
    ("torchrun x K over the GPUs", "InternVL2-40B", dict(count=4, procs=4), ["--gpus-per-model", "2"],
     "--gpus-per-model 2 for each of 4 processes (torchrun --nproc-per-node 4) needs 8 GPUs; 4 GPUs are visible: "
     "use --nproc-per-node 2"),
    ("K too few", "InternVL2-Llama3-76B", dict(count=8), ["--gpus-per-model", "2"],
     "InternVL2-Llama3-76B needs 3 GPUs of 80 GB per model at batch 8 (142 GB of weights in bfloat16); "
     "--gpus-per-model 2 given"),
    ("auto: too few GPUs", "InternVL2-Llama3-76B", dict(count=2), [],
     "InternVL2-Llama3-76B needs 3 GPUs of 80 GB per model at batch 8 (142 GB of weights in bfloat16); "
     "2 GPUs are visible"),
    ("auto: too few for the processes", "InternVL2-40B", dict(count=8, procs=8), [],
     "InternVL2-40B needs 2 GPUs of 80 GB per model at batch 8 (75 GB of weights in bfloat16); 8 processes "
     "(torchrun --nproc-per-node 8) need 16, 8 GPUs are visible: use --nproc-per-node 4"),
    ("batch too large for K", "InternVL2-26B", dict(count=1), ["--gpus-per-model", "1", "--batch-size", "64"],
     "InternVL2-26B needs 2 GPUs of 80 GB per model at batch 64 (48 GB of weights in bfloat16); --gpus-per-model 1 "
     "given (--batch-size 16 fits 1)"),
    ("GPUs in use", "InternVL2-40B", dict(count=2, free=[30.0, 30.0]), [],
     "InternVL2-40B needs 5 GPUs of 80 GB (22 GB usable now) per model at batch 8 (75 GB of weights in bfloat16); "
     "2 GPUs are visible"),
    ("K not dividing the GPUs", "InternVL2-Llama3-76B", dict(count=8, procs=2), ["--gpus-per-model", "3"],
     "--gpus-per-model 3 does not divide the GPUs: 8 GPUs are visible, so 2 would hold no model; use one of 1, 2, 4, "
     "8 (or CUDA_VISIBLE_DEVICES)"),
    ("more GPUs than layers", "InternVL2-1B", dict(count=32), ["--gpus-per-model", "32"],
     "a model of 24 LLM layers can be spread over 1 to 24 GPUs, not 32"),
]


def run(command: str, model: Path, extra: list[str], fixtures: Path, tmp_path: Path) -> list[str]:
    if command == "eval":
        return ["eval", str(model), "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out"), *extra]
    return ["caption", str(model), str(fixtures / SCENE), *extra]


@pytest.mark.parametrize("command", ["eval", "caption"])
@pytest.mark.parametrize("case,model,gpus,extra,message", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_refusals_are_one_line_before_anything_loads(command, case, model, gpus, extra, message, fixtures, tmp_path,
                                                     monkeypatch, nothing_loads, capsys):
    if command == "caption" and gpus.get("procs", 1) > 1:
        pytest.skip("caption runs in one process: torchrun's processes do not apply")
    fake_gpus(monkeypatch, **gpus)
    code = main(run(command, RELEASES / model, extra, fixtures, tmp_path))
    err = capsys.readouterr().err
    assert code == 2, err
    assert err == f"captune: error: {message}\n"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["eval", "caption"])
def test_cpu_refuses_more_than_one_gpu(command, fixtures, tmp_path, nothing_loads, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code = main(run(command, RELEASES / "InternVL2-2B", ["--gpus-per-model", "2", "--device", "cpu"], fixtures,
                    tmp_path))
    assert code == 2
    assert capsys.readouterr().err == ("captune: error: --gpus-per-model 2 spreads a model over CUDA GPUs: none is "
                                       "visible\n")


@pytest.mark.parametrize("value", ["0", "two", "-1", "1.5"])
def test_a_bad_count_is_an_argparse_error(value, capsys):
    for command in (["caption", "m", "i"], ["eval", "m"]):
        with pytest.raises(SystemExit) as stop:
            main([*command, f"--gpus-per-model={value}"])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and "Traceback" not in err
        assert err.splitlines()[-1] == (f"captune {command[0]}: error: argument --gpus-per-model: must be auto or a "
                                        f"whole number at least 1, got '{value}'")


def ids(gpus: L.ModelGPUs) -> list[int]:
    return sorted({d.index for d in gpus.device_map.values()}) if gpus.device_map else [gpus.device.index]


@pytest.mark.parametrize("model,gpus,kwargs,expected_ids,batch", [
    ("InternVL2-2B", dict(count=8), {}, [0], 64),  # fits one GPU at captune eval's default batch
    ("InternVL2-26B", dict(count=8), {}, [0], 16),  # one GPU, at the largest batch that fits it (32 does not)
    ("InternVL2-26B", dict(count=8, total=141.0), {}, [0], 64),  # an H200 holds batch 64
    ("InternVL2-40B", dict(count=8), {}, [0, 1], 32),
    ("InternVL2-40B", dict(count=8, total=141.0), {}, [0], 32),
    # the fewest that fit among those that divide the GPUs: 3 would fit, 4 leave no GPU idle under torchrun
    ("InternVL2-Llama3-76B", dict(count=8), {}, [0, 1, 2, 3], 32),
    ("InternVL2-Llama3-76B", dict(count=8, procs=2, rank=1), {}, [4, 5, 6, 7], 32),
    ("InternVL2-Llama3-76B", dict(count=6), {}, [0, 1, 2], 32),
    ("InternVL2-Llama3-76B", dict(count=8), {"batch_size": 64}, [0, 1, 2, 3, 4, 5, 6, 7], 64),  # 5 fit
    ("InternVL2-40B", dict(count=8, procs=4, rank=3), {}, [6, 7], 32),  # torchrun: rank r takes 2r, 2r+1
    ("InternVL2-40B", dict(count=8), {"device": "cuda:4"}, [4, 5], 32),
    ("InternVL2-8B", dict(count=8), {"gpus_per_model": 4}, [0, 1, 2, 3], 64),  # asked for, though one would do
    ("InternVL2-Llama3-76B", dict(count=8), {"gpus_per_model": 3}, [0, 1, 2], 32),  # one process: not refused
    ("InternVL2-8B", dict(count=8, procs=2, rank=1), {"gpus_per_model": "4"}, [4, 5, 6, 7], 64),
])
def test_gpus_and_batch_chosen(model, gpus, kwargs, expected_ids, batch, monkeypatch):
    fake_gpus(monkeypatch, **gpus)
    chosen = L.assign_gpus(RELEASES / model, **kwargs)
    assert ids(chosen) == expected_ids
    assert chosen.device == torch.device("cuda", expected_ids[0]) and chosen.batch == batch
    assert chosen.placement.fits and chosen.placement.gpus == len(expected_ids)
    if chosen.device_map:
        assert chosen.device_map["model.vision_tower"] == chosen.device
        assert chosen.device_map["lm_head"] == torch.device("cuda", expected_ids[-1])


def test_a_gpu_in_use_takes_fewer_layers(monkeypatch):
    fake_gpus(monkeypatch, 4, free=[50.0, 80.0, 80.0, 80.0])
    busy = L.assign_gpus(RELEASES / "InternVL2-40B").placement
    fake_gpus(monkeypatch, 4)
    idle = L.assign_gpus(RELEASES / "InternVL2-40B").placement
    assert busy.gpus == idle.gpus == 2 and busy.layers[0] < idle.layers[0]
    assert busy.capacity_gb == (42.0, 72.0)


def test_under_torchrun_each_process_checks_its_own_gpus_free_memory(monkeypatch):
    """Several processes plan from the cards' size (the same K everywhere), then each checks its own GPUs."""
    fake_gpus(monkeypatch, 8, free=[80.0] * 6 + [20.0, 80.0], procs=4, rank=3)
    with pytest.raises(CaptuneError, match=r"InternVL2-40B over cuda:6 to cuda:7 \(local rank 3\) needs .* GB per GPU "
                                           r"at batch 8; free now: 12, 72 GB \(other processes\?\)"):
        L.assign_gpus(RELEASES / "InternVL2-40B")
    fake_gpus(monkeypatch, 8, free=[80.0] * 6 + [20.0, 80.0], procs=4, rank=2)
    assert ids(L.assign_gpus(RELEASES / "InternVL2-40B")) == [4, 5]


def test_cpu_keeps_the_whole_model_on_it():
    chosen = L.assign_gpus(RELEASES / "InternVL2-40B", "auto", device="cpu", batch_size=4)
    assert chosen == L.ModelGPUs(torch.device("cpu"), None, 4, None)
    assert L.assign_gpus("no-such-folder", 1, device="cpu").device_map is None  # nothing is read for the CPU


def test_gpus_left_idle_under_torchrun_are_said(monkeypatch):
    fake_gpus(monkeypatch, 8, procs=2)
    monkeypatch.setenv("RANK", "0")
    with pytest.warns(UserWarning, match=r"2 processes x 2 GPUs per model use 4 of the 8 GPUs visible; torchrun "
                                         r"--nproc-per-node 4 would use 8"):
        L.assign_gpus(RELEASES / "InternVL2-40B")


@pytest.mark.parametrize("model", sorted(p.name for p in RELEASES.iterdir()))
@pytest.mark.parametrize("gpus", [1, 8])
def test_auto_takes_what_captune_plan_lays_out(model, gpus, monkeypatch, capsys):
    """`captune eval` under `torchrun --nproc-per-node R` (R: the plan's replicas) puts each model on the plan's
    number of GPUs, and says nothing of idle GPUs."""
    import warnings

    from captune.internvl.plan import plan

    planned = plan(RELEASES / model, gpus=gpus)["eval"]
    capsys.readouterr()
    if not planned["fits"]:
        assert gpus == 1
        return
    fake_gpus(monkeypatch, gpus, procs=planned["replicas"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        chosen = L.assign_gpus(RELEASES / model)
    assert chosen.placement.gpus == planned["gpus_per_model"]
