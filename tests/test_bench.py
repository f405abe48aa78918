"""The GPU benchmark's every path (training step with each optimizer, FLOP count, sampler + text encoder + decoder)
on tiny models, so the script the README's GPU table comes from keeps running on a CPU."""
import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_bench_tiny_runs_every_path(tmp_path):
    r = subprocess.run([sys.executable, "bench/gpu_bench.py", "--tiny=True", f"--out={tmp_path}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.load(open(tmp_path / "gpu_bench.json"))
    assert [(t["optimizer"], t["grad_checkpointing"]) for t in report["train"]] == [
        ("came8bit", False), ("adamw", False), ("came8bit", True)]
    for t in report["train"]:
        assert t["steps_per_s"] > 0 and math.isfinite(t["final_loss"])
        assert t["model_tflop_per_step"] == report["train"][0]["model_tflop_per_step"] > 0  # same model, same count
    assert [i["preset"] for i in report["inference"]] == ["sana1.5-1.6b", "sana1.5-4.8b"]
    assert all(i["latency_s"] > 0 and i["throughput_samples_per_s"] > 0 for i in report["inference"])


def test_gpu_bench_rejects_unknown_flags_and_bad_values():
    for arg in ("--nope=1", "--tiny=maybe", "--train_batch=eight"):
        r = subprocess.run([sys.executable, "bench/gpu_bench.py", arg], cwd=ROOT, capture_output=True, text=True,
                           timeout=120)
        assert r.returncode != 0 and f"bad argument '{arg}'" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_gpu_bench_training_rows_only(tmp_path):
    r = subprocess.run([sys.executable, "bench/gpu_bench.py", "--tiny=True", "--infer_presets=none", f"--out={tmp_path}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.load(open(tmp_path / "gpu_bench.json"))
    assert len(report["train"]) == 3 and report["inference"] == []
