"""train.py: the flow objective, resume, accumulation, DDP/FSDP on gloo, atomic checkpoints, bad input."""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from model import LinearDiT
from train import TrainConfig, flow_loss, make_data, parse_config, train, build_model
from shapes import CATEGORIES, ShapesData, as_prompt, category_of

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(tmp_path, **kw):
    base = dict(out_dir=str(tmp_path / "run"), preset="shapes-tiny", batch_size=8, max_steps=4, lr=1e-3,
                warmup_steps=1, flow_shift=1.0, log_every=1, save_every=1000, progress=False, dtype="float32")
    base.update(kw)
    return TrainConfig(**base)


def weights(path):
    return LinearDiT.from_pretrained(path).state_dict()


def test_loss_falls_on_a_fixed_batch(tmp_path):
    cfg = tiny(tmp_path)
    torch.manual_seed(0)
    model = build_model(cfg)
    data = make_data(cfg, model.config)
    batch = data.get_batch(0, 16)
    y_null, mask_null = data.null()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = flow_loss(model, batch, y_null, mask_null, 0, 0, cfg, torch.autocast("cpu", enabled=False))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_resume_gives_the_same_losses(tmp_path):
    full = train(tiny(tmp_path / "a", max_steps=6))
    train(tiny(tmp_path / "b", max_steps=3))
    resumed = train(tiny(tmp_path / "b", max_steps=6, resume=True))
    assert full["losses"][3:] == resumed["losses"]  # bit-identical: same data, noise, optimizer state
    assert torch.equal(torch.cat([v.flatten() for v in weights(str(tmp_path / "a/run/ckpt/model.safetensors")).values()]),
                       torch.cat([v.flatten() for v in weights(str(tmp_path / "b/run/ckpt/model.safetensors")).values()]))


def test_validation_loss_is_logged_and_does_not_change_the_run(tmp_path):
    plain = train(tiny(tmp_path / "a", max_steps=4))
    checked = train(tiny(tmp_path / "b", max_steps=4, val_every=2, val_batches=2))
    assert plain["losses"] == checked["losses"]  # forward-only on batches no run trains on: training is untouched
    lines = [json.loads(l) for l in open(tmp_path / "b/run/log.jsonl")]
    vals = [(e["step"], e["val_loss"]) for e in lines if "val_loss" in e]
    assert [s for s, _ in vals] == [2, 4] and all(v > 0 for _, v in vals) and vals[0][1] != vals[1][1]
    with pytest.raises(SystemExit) as e:
        train(tiny(tmp_path / "c", val_every=2, val_batches=0))
    assert e.value.code == 2  # a usage error: "--val_batches=0: must be an integer >= 1" on stderr
    # the same weights give the same number (fixed batches, noise and sigma), unlike the training loss
    from train import validation_loss
    cfg = tiny(tmp_path / "b", val_batches=2)
    model = LinearDiT.from_pretrained(str(tmp_path / "b/run/ckpt/model.safetensors"))
    data = make_data(cfg, model.config)
    y_null, mask_null = data.null()
    again = [validation_loss(model, data, y_null, mask_null, cfg, "cpu", torch.autocast("cpu", enabled=False))
             for _ in range(2)]
    assert again[0] == again[1] == pytest.approx(vals[1][1], rel=1e-6)
    # in micro-batches (as under accumulation or several processes): the same loss
    chunked = validation_loss(model, data, y_null, mask_null, cfg, "cpu", torch.autocast("cpu", enabled=False), 4)
    assert chunked == pytest.approx(again[0], rel=1e-5)


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    big = train(tiny(tmp_path / "big", max_steps=2, optimizer="adamw"))
    acc = train(tiny(tmp_path / "acc", max_steps=2, optimizer="adamw", micro_batch_size=2))
    for (s1, l1), (s2, l2) in zip(big["losses"], acc["losses"]):
        assert s1 == s2 and abs(l1 - l2) < 1e-5
    a = weights(str(tmp_path / "big/run/ckpt/model.safetensors"))
    b = weights(str(tmp_path / "acc/run/ckpt/model.safetensors"))
    for k in a:
        # 1e-5: summation order differs between CPUs (2.4e-6 seen on an AMD EPYC); a wrong accumulation moves
        # weights by a whole Adam step (~lr)
        assert torch.allclose(a[k], b[k], atol=1e-5), k


def torchrun(args, nproc=2):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "train.py", *args]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one(tmp_path, mode):
    one = tiny(tmp_path / "one", max_steps=2, optimizer="adamw")
    train(one)
    args = [f"--out_dir={tmp_path / 'two'}", "--preset=shapes-tiny", "--batch_size=8", "--max_steps=2", "--lr=1e-3",
            "--warmup_steps=1", "--flow_shift=1.0", "--log_every=1", "--progress=False", "--dtype=float32",
            "--optimizer=adamw", f"--fsdp={mode == 'fsdp'}"]
    torchrun(args)
    a = weights(str(tmp_path / "one/run/ckpt/model.safetensors"))
    b = weights(str(tmp_path / "two/ckpt/model.safetensors"))
    for k in a:
        # 1e-5: summation order differs between CPUs (2.4e-6 seen on an AMD EPYC); a wrong accumulation moves
        # weights by a whole Adam step (~lr)
        assert torch.allclose(a[k], b[k], atol=1e-5), k
    l1 = [json.loads(s)["loss"] for s in open(tmp_path / "one/run/log.jsonl")]
    l2 = [json.loads(s)["loss"] for s in open(tmp_path / "two/log.jsonl")]
    assert l1 == pytest.approx(l2, abs=1e-5)


def test_kill_during_save_leaves_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "train.py", f"--out_dir={out}", "--preset=shapes-tiny", "--batch_size=2", "--max_steps=100000",
           "--save_every=1", "--log_every=1000", "--progress=False", "--dtype=float32", "--flow_shift=1.0"]
    for delay in (0.0, 0.13, 0.37):
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        t0 = time.time()
        while not os.path.exists(out / "ckpt") and time.time() - t0 < 120:
            time.sleep(0.05)
        time.sleep(delay)  # the loop saves every step: a kill lands in or near a save
        p.send_signal(signal.SIGKILL)
        p.wait()
        model = LinearDiT.from_pretrained(str(out / "ckpt/model.safetensors"))
        state = torch.load(out / "ckpt/state.pt", weights_only=True)
        assert int(model.meta["step"]) == state["step"] >= 1
        cmd = cmd + ["--resume"] if "--resume" not in cmd else cmd  # the next run continues the same folder


def usage_error(capsys, run):
    """run() stops with exit code 2 and one line on stderr (a flag the run cannot take): -> that line."""
    with pytest.raises(SystemExit) as e:
        run()
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error: ") and "\n" not in err, err
    return err


def files(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_a_diverging_run_keeps_its_last_finite_checkpoint(tmp_path):
    cfg = tiny(tmp_path, max_steps=50, lr=1e12, optimizer="adamw", grad_clip=0.0, save_every=1, log_every=10)
    with pytest.raises(SystemExit, match=r"loss is not finite at step (\d+).*last good checkpoint is (\S+)\.") as e:
        train(cfg)
    message = str(e.value.code)
    good = message.split("last good checkpoint is ")[1].split(". ")[0]
    bad_step = int(message.split("at step ")[1].split(";")[0])
    run = tmp_path / "run"
    assert os.path.realpath(run / "ckpt") == os.path.realpath(good)  # the link, and the only folder left
    assert [p.name for p in run.glob("ckpt-*")] == [os.path.basename(good)]
    model = LinearDiT.from_pretrained(str(run / "ckpt/model.safetensors"))  # finite: it loads
    assert int(model.meta["step"]) < bad_step
    kept = files(run / "ckpt")
    with pytest.raises(SystemExit, match="loss is not finite"):  # resuming diverges again, keeping the good one
        train(dataclasses.replace(cfg, resume=True))
    assert files(run / "ckpt") == kept


def test_a_model_with_a_non_finite_weight_is_never_saved(tmp_path):
    from train import save_checkpoint
    cfg = tiny(tmp_path, max_steps=1)
    train(cfg)
    run = tmp_path / "run"
    before = files(run)
    model = LinearDiT.from_pretrained(str(run / "ckpt/model.safetensors"))
    with torch.no_grad():
        model.blocks[0].mlp.point_conv.conv.weight[0, 0] = float("inf")
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(SystemExit, match="not saved: .*'blocks.0.mlp.point_conv.conv.weight' holds NaN or inf.*"
                                         "last good checkpoint is x"):
        save_checkpoint(cfg, model, None, opt, 2, 0, 1, "x")
    assert files(run) == before  # no ckpt-0000002, and the finite ckpt-0000001 is still there
    path = run / "nan.safetensors"
    from model import save_model
    save_model(model, str(path))
    r = subprocess.run([sys.executable, "sample.py", f"--ckpt={path}", f"--out={tmp_path / 's'}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and r.stderr.strip() == (f"error: {path}: tensor 'blocks.0.mlp.point_conv.conv.weight' "
                                                      f"holds NaN or inf (a diverged run); use an earlier checkpoint")


@pytest.mark.parametrize("layout, name", [("diffusers", "diffusers"), ("official", "model.pth")])
def test_the_final_model_is_also_written_in_another_layout(tmp_path, layout, name):
    train(tiny(tmp_path, max_steps=2, layout=layout))
    ours = LinearDiT.from_pretrained(str(tmp_path / "run/ckpt/model.safetensors"))
    other = LinearDiT.from_pretrained(str(tmp_path / "run" / name))
    assert other.config == ours.config and other.meta["layout"] == layout
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in ours.state_dict().items())


def test_a_used_out_dir_is_refused_and_left_byte_identical(tmp_path):
    train(tiny(tmp_path, max_steps=2, save_every=1))
    run = tmp_path / "run"
    before = files(run)
    with pytest.raises(SystemExit, match="holds another run .*--resume .*--overwrite"):
        train(tiny(tmp_path, max_steps=2))
    assert files(run) == before
    again = train(tiny(tmp_path, max_steps=1, overwrite=True))  # asked for: a fresh run in the same folder
    assert again["step"] == 1 and [p.name for p in run.glob("ckpt-*")] == ["ckpt-0000001"]
    assert len(open(run / "log.jsonl").read().splitlines()) == 1  # its own log, not appended to the first one


def test_one_run_per_out_dir_and_a_killed_run_leaves_no_lock(tmp_path):
    out = tmp_path / "run"
    args = [f"--out_dir={out}", "--preset=shapes-tiny", "--batch_size=2", "--log_every=1000", "--progress=False",
            "--dtype=float32", "--flow_shift=1.0"]
    first = subprocess.Popen([sys.executable, "train.py", *args, "--max_steps=100000", "--save_every=1"], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        t0 = time.time()
        while not os.path.exists(out / "ckpt") and time.time() - t0 < 120:
            time.sleep(0.05)
        second = subprocess.run([sys.executable, "train.py", *args, "--max_steps=100000", "--resume"], cwd=ROOT,
                                capture_output=True, text=True, timeout=120)
        assert second.returncode != 0 and f"another run (process {first.pid}) is training in {out}" in second.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    step = torch.load(out / "ckpt/state.pt", weights_only=True)["step"]
    third = subprocess.run([sys.executable, "train.py", *args, f"--max_steps={step + 1}", "--resume"], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert third.returncode == 0, third.stderr[-2000:]  # the killed run's lock is taken over
    assert torch.load(out / "ckpt/state.pt", weights_only=True)["step"] == step + 1


def test_bad_flags_and_checkpoints_one_line_errors(tmp_path, capsys):
    for argv, pattern in [(["--nope=1"], "unknown option 'nope'"), (["--lr=fast"], "is not a float"),
                          (["--fsdp=maybe"], "is not a bool"), (["config/missing.py"], "not found")]:
        assert pattern in usage_error(capsys, lambda: parse_config(argv))
    assert parse_config(["--grow_from", "x.pt", "--resume", "--lr", "2e-5"]).grow_from == "x.pt"
    for flag, bad in [("lr", "nan"), ("lr", "inf"), ("lr", "0"), ("flow_shift", "nan"), ("max_steps", "0"),
                      ("batch_size", "0"), ("batch_size", "-3"), ("image_size", "-8"), ("ema_decay", "1"),
                      ("cfg_dropout", "1.5"), ("logit_mean", "-inf"), ("eval_cfg", "nan"), ("save_every", "0"),
                      ("decay_steps", "-1"), ("val_every", "-1"), ("curriculum_steps", "-1"), ("seed", "-1")]:
        cfg = parse_config([f"--{flag}={bad}", f"--out_dir={tmp_path / 'never'}"])
        assert usage_error(capsys, lambda: train(cfg)).startswith(f"error: --{flag}=")
        assert not (tmp_path / "never").exists()  # refused before anything was made
    assert "--resume" in usage_error(capsys, lambda: train(tiny(tmp_path, resume=True, overwrite=True)))
    with pytest.raises(SystemExit, match="not found"):
        train(tiny(tmp_path, init_from=str(tmp_path / "missing.safetensors")))
    with pytest.raises(SystemExit, match="not divisible|multiple"):
        train(tiny(tmp_path, batch_size=8, micro_batch_size=3))
    with pytest.raises(SystemExit, match="unknown preset"):
        train(tiny(tmp_path, preset="gpt5"))
    with pytest.raises(SystemExit, match="no training state"):
        train(tiny(tmp_path / "fresh", resume=True))
    for bad in ("position", "pos=2", "colors=-1", ",".join(f"{c}=0" for c in CATEGORIES)):
        with pytest.raises(SystemExit, match="shapes_weights") as e:
            train(tiny(tmp_path, shapes_weights=bad))
        assert "\n" not in str(e.value)
    for bad in (dict(curriculum_steps=10), dict(curriculum_weights="colors=1")):
        with pytest.raises(SystemExit, match="curriculum_steps .* and --curriculum_weights"):
            train(tiny(tmp_path, **bad))
    with pytest.raises(SystemExit, match="--curriculum_weights item 'pos=2'"):
        train(tiny(tmp_path, curriculum_steps=10, curriculum_weights="pos=2"))
    with pytest.raises(SystemExit, match="folder of images: drop them"):
        train(tiny(tmp_path, data=str(tmp_path), curriculum_steps=10, curriculum_weights="colors=1"))


def test_shapes_weights_set_how_often_each_category_is_drawn():
    from train import category_weights
    weights = category_weights("position=3, color_attr=0")
    assert weights == {**dict.fromkeys(CATEGORIES, 1.0), "position": 3.0, "color_attr": 0.0}
    assert category_weights("") is None  # uniform
    data = ShapesData(weights=weights)
    cats = [category_of(p.spec) for s in range(4) for p in map(as_prompt, data.get_batch(s, 200)["prompts"])]
    assert "color_attr" not in cats and cats.count("position") > 2 * cats.count("colors")  # 3/8 vs 1/8 expected


def test_curriculum_draws_its_own_mix_for_the_first_steps():
    only = {c: float(c == "color_attr") for c in CATEGORIES}
    data = ShapesData(curriculum_steps=3, curriculum_weights=only)
    cats = [[category_of(p.spec) for p in map(as_prompt, data.get_batch(s, 100)["prompts"])] for s in range(5)]
    assert all(set(c) == {"color_attr"} for c in cats[:3])  # steps 0-2: the curriculum's mix alone
    assert all(len(set(c)) == 6 for c in cats[3:])  # then the uniform mix: all six categories in 100 draws
    plain = ShapesData()
    assert data.get_batch(3, 8)["prompts"] == plain.get_batch(3, 8)["prompts"]  # same stream after it
    assert data.get_batch(0, 8)["prompts"] != plain.get_batch(0, 8)["prompts"]


def test_lr_warms_up_then_cools_down_to_zero():
    from train import lr_at
    cfg = TrainConfig(lr=1.0, warmup_steps=10, max_steps=100, decay_steps=20)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == lr_at(79, cfg) == pytest.approx(1.0)
    assert lr_at(90, cfg) == pytest.approx(0.5) and lr_at(99, cfg) == pytest.approx(0.05)
    assert lr_at(99, dataclasses.replace(cfg, decay_steps=0)) == pytest.approx(1.0)  # official: constant


def test_dry_run_allocates_nothing(capsys):
    from train import dry_run
    rows = dry_run(dataclasses.replace(TrainConfig(), preset="sana1.5-4.8b", image_size=1024, batch_size=64, gpus=64,
                                       fsdp=True, grad_checkpointing=True))
    out = capsys.readouterr().out
    assert "4.7" in out and "came8bit" in out
    (_, came8, _), (_, came32, _), (_, adamw, _) = rows
    assert came8 < came32 < adamw


def test_every_config_file_parses():
    """Each preset in config/ reads with only known keys; the 10-minute one is the shipped recipe scaled."""
    configs = sorted(p for p in os.listdir(os.path.join(ROOT, "config")) if p.endswith(".py"))
    assert {"shapes.py", "shapes_10min.py", "sana1.6b_finetune.py", "sana1.5_4.8b_grow.py"} <= set(configs)
    for name in configs:
        parse_config([os.path.join(ROOT, "config", name)])
    ten = parse_config([os.path.join(ROOT, "config", "shapes_10min.py")])
    assert ten.preset == "shapes-c4" and ten.curriculum_steps < ten.max_steps - ten.decay_steps
    assert "color_attr=1" in ten.curriculum_weights
