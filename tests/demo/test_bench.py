"""The GPU benchmark scripts run end to end (on a tiny architecture, CPU); their numbers come from the GPU."""

from __future__ import annotations

from captune.demo.bench import bench_train, internvl2_2b_config
from captune.demo.bench_eval import bench_eval


def test_bench_eval_runs(tmp_path):
    r = bench_eval(images=4, baseline_images=2, batch_sizes=(2,), workers=0, tokens=3, device="cpu",
                   out=str(tmp_path), model_config=internvl2_2b_config(tiny=True), agreement_images=3)
    assert r["tiles_per_image"] == 7
    assert r["a_one_at_a_time"]["images_per_s"] > 0 and r["b_captune_batch2"]["images_per_s"] > 0
    assert r["b_captune_batch2"]["speedup_vs_c"] > 0
    # float32 on the CPU: captune's captions are generate's and batch 1's
    assert r["agreement_batch2"]["captune_vs_generate"] == {"images": 4, "identical": 4, "share": 1.0}
    assert r["agreement_batch2"]["captune_vs_batch1"] == {"images": 3, "identical": 3, "share": 1.0}
    assert r["breakdown_batch2"]["vision_tower_s"] > 0
    assert (tmp_path / "bench_eval.json").is_file()


def test_bench_train_runs(tmp_path):
    r = bench_train(steps=1, warmup=0, budgets=(4000,), device="cpu", out=str(tmp_path),
                    model_config=internvl2_2b_config(tiny=True))
    v = r["variants"]
    assert v["a_tutorial"]["captions_per_microbatch"] == 4
    assert v["b_eager"]["captions_per_microbatch"] == 10  # two images, five captions each
    assert v["b_eager"]["row_tokens"] == 4000  # padded to the budget (one shape for the compiled model)
    assert v["b_eager"]["tokens_per_microbatch"] < 2.5 * v["a_tutorial"]["tokens_per_microbatch"] / 4 * 10 / 5
