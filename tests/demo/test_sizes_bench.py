"""benchmarks/sizes.py (every release size on one GPU against `captune plan`) runs end to end with --tiny on the
CPU: the same code as on the GPU (random weights built in place, generation, a LoRA step wrapped by FSDP2 in a process
group of one, the 76B at two depths extrapolated to 80 layers), tiny widths; its numbers come from the GPU."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "sizes.py"


def test_sizes_benchmark_runs_tiny_on_the_cpu(tmp_path):
    cmd = [sys.executable, str(SCRIPT), "--tiny", "--sizes", "8b,76b-depth", "--batch", "2", "--tiles", "1",
           "--new-tokens", "2", "--train-images", "1", "--captions", "2", "--depths", "1,2", "--warmup", "0",
           "--repeats", "1", "--device", "cpu", "--out", str(tmp_path)]
    run = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((tmp_path / "sizes.json").read_text())
    assert result["tiny"] and result["device"] == "cpu"
    size = result["sizes"]["8b"]
    assert size["release"] == "InternVL2-8B" and "error" not in size["eval"] and "error" not in size["train"], size
    assert size["eval"]["new_tokens"] == 2 and size["eval"]["images_per_s"] > 0
    train = size["train"]
    assert train["wrapping"].startswith("FSDP2 (FSDP") and train["wrapping"].endswith("process group of 1")
    assert train["lora_rank"] == 16 and train["captions"] == 2 and math.isfinite(train["loss"])
    assert size["plan"]["llm_layers"] == 2 and size["train"]["seconds_per_step_vs_plan"] > 0
    depth = result["sizes"]["76b-depth"]
    assert set(depth["depths"]) == {"1", "2"} and "EXTRAPOLATED" in depth["note"]
    assert depth["plan"]["llm_layers"] == 80 and depth["depths"]["2"]["plan"]["llm_layers"] == 2
    assert {"seconds_per_batch", "seconds_per_batch_vs_plan"} <= set(depth["eval"])
    assert {"seconds_per_step", "seconds_per_step_per_layer"} <= set(depth["train"])
    assert "8b " in run.stdout and "(plan " in run.stdout  # the summary: measured (plan, ratio)


def test_extrapolation_is_linear_per_layer():
    spec = importlib.util.spec_from_file_location("sizes_bench", SCRIPT)
    sizes = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sizes)
    runs = {10: {"eval": {"peak_gb": 60.0}, "train": {"error": "out of memory"}},
            20: {"eval": {"peak_gb": 70.0}, "train": {"seconds_per_step": 2.0}}}
    out = sizes.extrapolate(runs, 80)
    assert out == {"eval": {"peak_gb": 130.0, "peak_gb_per_layer": 1.0}}
