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


def test_came8bit_bench_times_other_stack_limits_and_rejects_bad_flags():
    r = subprocess.run([sys.executable, "bench/came8bit_bench.py", "--timing_preset=shapes-tiny", "--stacks=10,22",
                        "--repeats=1", "--steps=1", "--threads=1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [line.split()[0:2] for line in r.stdout.splitlines() if "x AdamW" in line]
    assert [" ".join(x) if x[0] == "CAME-8bit" and x[1].startswith("2^") else x[0] for x in rows] == [
        "AdamW", "CAME-8bit", "CAME-32", "CAME-8bit 2^10", "CAME-8bit 2^22"]
    # in process: a step at another limit runs at that limit and puts came8bit.py's own back
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import came8bit
    import came8bit_bench
    seen, own = [], dict(came8bit.MAX_STACK)
    class Probe:
        def step(self):
            seen.append(came8bit.MAX_STACK["cpu"])
    came8bit_bench.step(Probe(), 2**10)
    came8bit_bench.step(Probe(), None)
    assert seen == [2**10, own["cpu"]] and came8bit.MAX_STACK == own
    for arg, says in (("--stacks=x", "bad --stacks"), ("--device=tpu", "bad --device"),
                      ("--compile=maybe", "bad --compile")):
        r = subprocess.run([sys.executable, "bench/came8bit_bench.py", arg], cwd=ROOT, capture_output=True, text=True,
                           timeout=120)
        assert r.returncode != 0 and says in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_diffusers_bench_runs_tiny_and_rejects_bad_flags():
    r = subprocess.run([sys.executable, "bench/diffusers_bench.py", "--depth=1", "--width=64", "--sizes=4,8",
                        "--repeats=1", "--threads=1", "--text_tokens=16"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    try:
        import diffusers  # noqa: F401
    except ImportError:
        assert "diffusers is not installed" in r.stdout and len(r.stdout.strip().splitlines()) == 1
        return
    lines = r.stdout.splitlines()
    difference = float(lines[0].split("differ by ")[1].split()[0])
    assert difference < 1e-5  # the same weights give the same function
    rows = [line.split() for line in lines if line.strip().startswith(("4x4", "8x8")) and "->" not in line]
    assert [row[0] for row in rows] == ["4x4", "8x8"] and all(float(row[-1]) > 0 for row in rows)
    assert "4x4 -> 8x8 (4x tokens): ours" in r.stdout
    for arg, says in (("--sizes=a", "bad --sizes"), ("--nope=1", "bad argument"), ("--qk_norm=maybe", "bad --qk_norm"),
                      ("--malloc=tcmalloc", "bad --malloc")):
        r = subprocess.run([sys.executable, "bench/diffusers_bench.py", arg], cwd=ROOT, capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 2 and says in r.stderr and len(r.stderr.strip().splitlines()) == 1
