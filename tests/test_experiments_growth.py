"""experiments/growth.py and experiments/came_convergence.py: --quick runs end to end, the compute accounting
against hand-computed numbers, NaN runs recorded and finished runs reused, bad flags rejected."""
import dataclasses
import json
import os
import shutil
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))
import came_convergence  # noqa: E402
import common  # noqa: E402
import growth  # noqa: E402

try:
    import matplotlib  # noqa: F401  (optional: the PNGs are only written when it is installed)
    HAVE_MPL = True
except ImportError:
    HAVE_MPL = False


def test_growth_quick_end_to_end_and_reuse(tmp_path, capsys):
    out = tmp_path / "g"
    res = growth.main(["--out", str(out), "--quick"])
    data = json.loads((out / "results.json").read_text())
    assert data["command"] == f"python experiments/growth.py --out {out} --quick"
    assert set(data["runs"]) == {"small", "scratch", "partial", "cyclic", "block"}
    assert all(r["status"] == "ok" for r in data["runs"].values())
    steps = {name: [s for s, _ in r["losses"]] for name, r in data["runs"].items()}
    assert steps["small"] == [1, 2, 3] and steps["scratch"] == [1, 2, 3, 4, 5, 6] and steps["block"] == [1, 2, 3]
    assert data["runs"]["scratch"]["evals"][-1][0] == 6  # the checker ran at the last step
    assert data["flop_ratio"] == pytest.approx(4 / 12) and data["small_offset_steps"] == pytest.approx(1.0)
    assert data["settings"]["train_config"]["preset"] == "shapes-tiny"
    for init in ("partial", "cyclic", "block"):
        g = data["grown"][init]
        assert set(g) == {"status", "nan_step", "final_loss", "final_checker", "loss", "checker", "final_val", "val",
                          "matched"}
        assert g["val"] is None and g["final_val"] is None and g["matched"] is None  # no --val_every
        for r in (g["loss"], g["checker"]):
            if r["reached"]:  # grown steps + the small model's 3 steps at 4/12 of the cost
                assert r["equivalent_steps"] == pytest.approx(1.0 + r["steps"])
                assert r["saving_steps_pct"] == pytest.approx(100 * (1 - r["equivalent_steps"] / 6))
    # the grown run really started from the small checkpoint, with the requested strategy
    grown_cfg = json.loads((out / "grown_block" / "run.json").read_text())["train_config"]
    assert grown_cfg["grow_init"] == "block" and grown_cfg["grow_drop_last"] == 0 and grown_cfg["depth"] == 12
    assert grown_cfg["grow_from"].endswith(os.path.join("small", "ckpt-0000003", "model.safetensors"))
    assert json.loads((out / "grown_partial" / "run.json").read_text())["train_config"]["grow_drop_last"] == 2
    md = (out / "results.md").read_text()
    assert data["command"] in md and "| run |" in md and md.count("\n| ") == 5  # header + scratch + 3 grown
    assert os.path.exists(out / "growth.png") == HAVE_MPL
    assert res["target_loss"] == data["target_loss"]

    # running the same command again reuses every finished run: nothing is retrained
    before = {p: os.path.getmtime(out / p / "log.jsonl") for p in ("small", "scratch", "grown_partial")}
    capsys.readouterr()
    again = growth.main(["--out", str(out), "--quick"])
    assert capsys.readouterr().out.count("reusing the finished run") == 5
    assert before == {p: os.path.getmtime(out / p / "log.jsonl") for p in before}
    assert again["grown"] == res["grown"]
    # ... unless the small model it was grown from is a different file now (retrained)
    grown = common.TrainConfig(**json.loads((out / "grown_partial" / "run.json").read_text())["train_config"])
    assert common.is_finished(grown)
    stat = os.stat(grown.grow_from)
    os.utime(grown.grow_from, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert not common.is_finished(grown)


def test_growth_jobs_trains_the_same_runs_side_by_side(tmp_path):
    """--jobs 2: scratch trains in a second process beside the small model, then the grown run; same numbers."""
    threads = torch.get_num_threads()
    try:
        flags = ["--quick", "--inits", "partial", "--threads", "1", "--val_every", "3"]  # one thread everywhere: same math
        one = json.loads(json.dumps(growth.main(["--out", str(tmp_path / "one")] + flags)))
        two = json.loads(json.dumps(growth.main(["--out", str(tmp_path / "two"), "--jobs", "2"] + flags)))
    finally:
        torch.set_num_threads(threads)
    runs = [json.loads((tmp_path / run / "results.json").read_text())["runs"] for run in ("one", "two")]
    for name in ("small", "partial", "scratch"):  # the clock columns differ, the numbers may not
        assert runs[0][name]["status"] == runs[1][name]["status"] == "ok"
        assert runs[0][name]["losses"] == runs[1][name]["losses"] and runs[0][name]["evals"] == runs[1][name]["evals"]
        assert runs[0][name]["val"] == runs[1][name]["val"] and [s for s, _ in runs[0][name]["val"]][-1] in (3, 6)
    assert one["target_loss"] == two["target_loss"] and one["target_val"] == two["target_val"]
    assert one["grown"]["partial"]["final_loss"] == two["grown"]["partial"]["final_loss"]
    # the validation columns: scratch's final validation loss is the target
    assert one["target_val"] == runs[0]["scratch"]["val"][-1][1]
    assert one["grown"]["partial"]["final_val"] == runs[0]["partial"]["val"][-1][1]
    md = (tmp_path / "one" / "results.md").read_text()
    assert "validation loss, fixed batches" in md and "the paper's count" in md
    # --reanalyse rewrites the same report from results.json alone (e.g. logs brought back from a GPU machine)
    for name in ("small", "scratch", "grown_partial"):
        shutil.rmtree(tmp_path / "one" / name)
    again = json.loads(json.dumps(growth.main(["--out", str(tmp_path / "one"), "--reanalyse"])))
    assert again == one and (tmp_path / "one" / "results.md").read_text() == md
    with pytest.raises(SystemExit, match="run the experiment first"):
        growth.main(["--out", str(tmp_path / "nothing"), "--reanalyse"])


def test_came_quick_end_to_end(tmp_path):
    out = tmp_path / "c"
    came_convergence.main(["--out", str(out), "--quick"])
    data = json.loads((out / "results.json").read_text())
    assert set(data["runs"]) == {"came8bit", "came", "adamw", "came8bit_bc"}
    runs = data["runs"]
    for name in runs:  # the paper's optimizers run without the bias correction whatever the config says
        cfg = json.loads((out / name / "run.json").read_text())["train_config"]
        assert (cfg["optimizer"], cfg["came_bias_correction"]) == (name.removesuffix("_bc"), name == "came8bit_bc")
    for name, r in runs.items():
        assert r["status"] == "ok" and [s for s, _ in r["losses"]] == [1, 2, 3, 4]
        assert r["final_loss"] == pytest.approx(r["losses"][-1][1])  # 10% of 4 logged losses: the last one
        assert r["final_checker"] is not None and r["seconds_per_step"] > 0
    assert data["came8bit_over_came"] == pytest.approx(runs["came8bit"]["final_loss"] / runs["came"]["final_loss"])
    assert data["goal_within_2pct"] == (abs(data["came8bit_over_came"] - 1) <= 0.02)
    # AdamW-32: two fp32 moments per parameter (+ a 4-byte step per tensor); CAME-8bit holds less than CAME-32
    assert 8.0 <= runs["adamw"]["state_bytes_per_param"] < 8.1
    assert runs["came8bit"]["state_bytes"] < runs["came"]["state_bytes"] < runs["adamw"]["state_bytes"]
    assert runs["came8bit_bc"]["state_bytes"] == runs["came8bit"]["state_bytes"]  # a step count, no new tensors
    md = (out / "results.md").read_text()
    assert data["command"] in md and md.count("\n| ") == 5 and "CAME-8bit + bias corr." in md
    assert os.path.exists(out / "came.png") == HAVE_MPL


def synthetic(losses, evals=(), minutes_per_step=0.1, status="ok", message=""):
    return {"status": status, "nan_step": 2 if status == "nan" else None, "losses": [list(p) for p in losses],
            "evals": [list(p) for p in evals], "minutes": [[s, s * minutes_per_step] for s, _ in losses],
            "train_minutes": losses[-1][0] * minutes_per_step if losses else 0.0}


def test_growth_accounting_against_hand_computed_numbers():
    args = growth.parse_args(["--small_steps", "30", "--grow_steps", "30", "--smooth", "1", "--log_every", "10",
                              "--eval_every", "30"])
    runs = {
        "small": synthetic([(10, 9), (20, 8), (30, 7)], minutes_per_step=2 / 30),  # 2 minutes in all
        "scratch": synthetic([(s, 7 - s / 10) for s in range(10, 70, 10)], [(30, 0.2), (60, 0.4)], 10 / 60),
        "partial": synthetic([(10, 3), (20, 1), (30, 0.5)], [(30, 0.5)], 0.15),
        "cyclic": synthetic([(10, 3), (20, 2), (30, 1.5)], [(30, 0.1)]),
        "block": synthetic([(10, 5)], status="nan"),
    }
    res = growth.analyse(runs, args)
    assert res["target_loss"] == 1 and res["target_checker"] == 0.4
    loss = res["grown"]["partial"]["loss"]  # reaches loss 1 at its step 20: 30 * 4/12 + 20 = 30 of 60 steps
    assert loss["steps"] == 20 and loss["equivalent_steps"] == pytest.approx(30)
    assert loss["saving_steps_pct"] == pytest.approx(50)
    assert loss["minutes"] == pytest.approx(2 + 3) and loss["saving_minutes_pct"] == pytest.approx(50)
    checker = res["grown"]["partial"]["checker"]  # 0.5 >= 0.4 at step 30: 40 of 60
    assert checker["equivalent_steps"] == pytest.approx(40) and checker["saving_steps_pct"] == pytest.approx(100 / 3)
    assert not res["grown"]["cyclic"]["loss"]["reached"] and not res["grown"]["cyclic"]["checker"]["reached"]
    assert res["grown"]["block"]["status"] == "nan" and not res["grown"]["block"]["loss"]["reached"]
    # matched: scratch's steps to each grown run's final validation loss, with and without the small model
    runs["scratch"]["val"] = [[s, 7 - s / 10] for s in range(10, 70, 10)]  # 6.0 at 10 ... 1.0 at 60
    runs["partial"]["val"] = [[10, 4.5], [30, 3.5]]  # scratch reached 3.5 at step 40: 30 of 40 grown steps
    runs["cyclic"]["val"] = [[30, 0.5]]  # below scratch's final
    res = growth.analyse(runs, args)
    m = res["grown"]["partial"]["matched"]
    assert (m["value"], m["grown_steps"], m["scratch_steps"]) == (3.5, 30, 40)
    assert m["saving_grown_steps_pct"] == pytest.approx(25) and m["saving_with_small_pct"] == pytest.approx(0)
    assert res["grown"]["cyclic"]["matched"] is None
    md = growth.markdown(args, res, "cmd")
    assert "| partial | 3.5000 | 40 | 25% | 0% |" in md and "| cyclic | 0.5000 | below scratch's final |" in md
    assert "NaN at step 2" in md and "not reached" in md and "| 30 | 5.0 | 50% / 50% |" in md


def test_nan_run_is_recorded_and_reused(tmp_path, capsys):
    cfg = common.base_config("config/shapes.py", out_dir=str(tmp_path / "nan"), preset="shapes-tiny", depth=2,
                             batch_size=4, max_steps=4, lr=1e30, optimizer="adamw", warmup_steps=1, log_every=1,
                             eval_every=0, progress=False)
    run = common.run_once(cfg)  # lr 1e30: the first update blows the weights up, step 2's loss is not finite
    assert run["status"] == "nan" and run["nan_step"] == 2 and [s for s, _ in run["losses"]] == [1]
    mtime = os.path.getmtime(tmp_path / "nan" / "run.json")
    capsys.readouterr()
    assert common.run_once(cfg)["status"] == "nan"
    assert "reusing" in capsys.readouterr().out and os.path.getmtime(tmp_path / "nan" / "run.json") == mtime
    changed = common.is_finished(common.base_config("config/shapes.py", **{**cfg.__dict__, "lr": 1e-3}))
    assert not changed  # other settings in the same folder: not the same run


@pytest.mark.parametrize("argv", [["--inits", "partial,grow"], ["--small_depth", "12"], ["--small_depth", "5"],
                                  ["--eval_every", "-1"], ["--drop_last", "4"], ["--grow_steps", "0"],
                                  ["--preset", "nope"]])
def test_growth_rejects_bad_flags(argv):
    with pytest.raises(SystemExit, match="error:"):
        growth.parse_args(argv)


def test_defaults_are_the_laptop_models_latent_space():
    """Both experiments train config/shapes.py's preset by default: the 4-channel latents of the shipped model."""
    laptop = common.base_config("config/shapes.py").preset
    assert laptop == "shapes-c4"
    assert growth.parse_args([]).preset == came_convergence.parse_args([]).preset == laptop


def test_came_rejects_bad_flags():
    with pytest.raises(SystemExit, match="error:"):
        came_convergence.parse_args(["--optimizers", "came8bit,sgd"])
    with pytest.raises(SystemExit, match="error:"):
        came_convergence.parse_args(["--preset", "nope"])


def test_a_run_finished_before_a_new_config_field_is_reused_only_at_that_fields_default(tmp_path):
    """A run.json written before a TrainConfig field existed matches a config that leaves the field at its
    default (the run is the same), and not one that changes it."""
    cfg = common.TrainConfig(out_dir=str(tmp_path / "run"), max_steps=3, save_every=3)
    final = common.final_checkpoint(cfg)
    os.makedirs(os.path.dirname(final))
    open(final, "w").close()
    old = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "came_bias_correction"}
    (tmp_path / "run" / "run.json").write_text(json.dumps({"status": "ok", "train_config": old, "source": None}))
    assert common.is_finished(cfg)
    assert not common.is_finished(dataclasses.replace(cfg, came_bias_correction=True))
    assert not common.is_finished(dataclasses.replace(cfg, lr=cfg.lr * 2))
