"""Bad input in every script: each broken checkpoint kind and each impossible number gives one line, before any
work; nothing a user made is overwritten."""
import collections
import os
import subprocess
import sys

import pytest
import torch

import sample
from model import DCAE_PRESETS, DCAEDecoder, DiTConfig, LinearDiT, save_model
from prune import main as prune_main
from train import TrainConfig, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(ROOT, "weights", "shapes.safetensors")


class NotATensor:  # a pickled object: torch.load(weights_only=True) refuses it
    pass


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    """name -> path of each kind of checkpoint that does not load."""
    root = tmp_path_factory.mktemp("broken")
    whole = open(SHIPPED, "rb").read()
    files = {"empty.safetensors": b"", "truncated.safetensors": whole[:len(whole) // 2], "text.safetensors": b"hello",
             "empty.pth": b""}
    for name, data in files.items():
        (root / name).write_bytes(data)
    torch.save({"state_dict": collections.OrderedDict(), "object": NotATensor()}, root / "pickle.pth")
    torch.save({"state_dict": {"not_a_sana_key": torch.zeros(1)}}, root / "other.pth")
    return {p.name: str(p) for p in root.iterdir()}


def one_line(run):
    """run() ends in SystemExit with a one-line message (or, for a usage error, code 2 and nothing else)."""
    with pytest.raises(SystemExit) as e:
        run()
    said = str(e.value.code)
    assert said.startswith("error: ") and "\n" not in said, said
    return said


@pytest.mark.parametrize("kind", ["empty.safetensors", "truncated.safetensors", "text.safetensors", "empty.pth",
                                  "pickle.pth", "other.pth"])
def test_every_broken_checkpoint_kind_gives_one_line_in_every_script(broken, kind, tmp_path):
    path = broken[kind]
    said = [one_line(lambda: sample.main(["--ckpt", path, "--out", str(tmp_path / "s"), "--no_progress"])),
            one_line(lambda: train(TrainConfig(init_from=path, out_dir=str(tmp_path / "t"), progress=False))),
            one_line(lambda: prune_main(["--ckpt", path, "--keep", "2", "--out", str(tmp_path / "p/m.safetensors")]))]
    if kind.endswith(".safetensors"):  # an autoencoder file is a .safetensors
        said.append(one_line(lambda: sample.main(["--vae", path, "--out", str(tmp_path / "s"), "--no_progress"])))
    for line in said:
        assert path in line and "weights_only=False" not in line, line
    assert len(set(said[:3])) == 1  # one loader error path: the same words in every script


def test_grow_names_a_broken_file_in_one_line(broken, tmp_path):
    r = subprocess.run([sys.executable, "grow.py", "--src", broken["truncated.safetensors"], "--depth", "4", "--out",
                        str(tmp_path / "g.safetensors")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0
    assert r.stderr.startswith(f"error: {broken['truncated.safetensors']} does not read")


@pytest.mark.parametrize("argv, said", [
    (["--cfg", "nan"], "--cfg=nan: the guidance scale must be a finite number >= 0"),
    (["--cfg", "inf"], "--cfg=inf: the guidance scale"), (["--shift", "nan"], "--shift=nan: the flow shift"),
    (["--shift", "0"], "--shift=0.0: the flow shift"), (["--steps", "0"], "--steps=0: must be an integer >= 1"),
    (["--steps", "-3"], "--steps=-3: must be"), (["--size", "-8"], "argument --size: '-8': give a side"),
    (["--size", "64x0"], "argument --size: '64x0': give a side"), (["--size", "wide"], "argument --size: 'wide'"),
    (["--batch_size=0"], "--batch_size=0: must be"), (["--best_of", "0"], "--best_of=0: must be"),
    (["--safety_threshold", "nan"], "--safety_threshold=nan: a probability"),
    (["--steps", "x"], "argument --steps: invalid int value: 'x'"), (["--cfg"], "argument --cfg: expected one")])
def test_sample_numbers_are_checked_before_any_work(argv, said, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        sample.main(argv + ["--ckpt", str(tmp_path / "never_read.safetensors"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith(f"error: {said}") and "\n" not in err, err
    assert not (tmp_path / "o").exists()


def test_sample_refuses_an_unwritable_out_and_a_mismatched_decoder_before_sampling(tmp_path):
    (tmp_path / "file").write_text("")
    said = one_line(lambda: sample.main(["--ckpt", str(tmp_path / "never_read.safetensors"), "--out",
                                         str(tmp_path / "file" / "o")]))
    assert said.startswith(f"error: --out {tmp_path / 'file' / 'o'} is not a writable folder")
    vae = str(tmp_path / "vae32.safetensors")
    DCAEDecoder(DCAE_PRESETS["shapes-tiny"]).save_pretrained(vae)  # decodes 32-channel latents; the model makes 4
    said = one_line(lambda: sample.main(["--vae", vae, "--out", str(tmp_path / "o"), "--no_progress"]))
    assert "decodes 32-channel latents and the model makes 4-channel ones" in said
    assert os.listdir(tmp_path / "o") == []  # nothing was sampled


def test_prune_checks_its_numbers_and_never_replaces_an_earlier_result(tmp_path, capsys):
    ckpt = str(tmp_path / "m.safetensors")
    torch.manual_seed(0)
    save_model(LinearDiT(DiTConfig(in_channels=3, hidden_size=32, depth=3, linear_head_dim=16, cross_heads=2,
                                   caption_channels=8)), ckpt)
    for flag, bad in (("timesteps", "0"), ("flow_shift", "nan"), ("finetune_lr", "-1"), ("calib_prompts", "-5")):
        with pytest.raises(SystemExit) as e:
            prune_main(["--ckpt", ckpt, "--keep", "2", f"--{flag}={bad}"])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and err.startswith(f"error: --{flag}=") and "\n" not in err, err
    out = tmp_path / "earlier.safetensors"
    out.write_bytes(b"a model made by someone else")
    said = one_line(lambda: prune_main(["--ckpt", ckpt, "--keep", "2", "--out", str(out)]))
    assert "holds an earlier result; pass --overwrite" in said and out.read_bytes() == b"a model made by someone else"


def test_scripts_without_main_check_their_numbers_too():
    r = subprocess.run([sys.executable, "shapes.py", "--size", "-8"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == "error: --size=-8: must be >= 24 pixels (four objects of 7 pixels fit)"
