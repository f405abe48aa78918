"""Every command of the README's laptop quick start runs (with tiny settings), as printed."""
import os
import re
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_commands(section):
    """The `python ...` lines of the bash blocks under the README heading `section`."""
    text = open(os.path.join(ROOT, "README.md")).read()
    body = text.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    blocks = [b.replace("\\\n", " ") for b in re.findall(r"```bash\n(.*?)```", body, re.S)]  # join "\" continuations
    lines = [l.split("#")[0].strip() for block in blocks for l in block.splitlines()]
    cmds = [c.strip() for l in lines for c in l.split("&&")]  # "pip install ... && python sample.py"
    return [c for c in cmds if c.startswith("python ")]


def tiny(cmd, tmp):
    """The same command, pointed at tmp and shrunk: a 2-step run of the tiny preset instead of 10 minutes."""
    args = shlex.split(cmd)[1:]
    args = [re.sub(r"\bout/[\w.-]+/", f"{tmp}/shapes/", a) for a in args]  # every run folder: the tiny run's
    args = [f"--vae={tmp}/ae.safetensors" if a.startswith("--vae=") else a for a in args]  # the autoencoder written above
    script = args[0]
    if script == "train.py":
        args += [f"--out_dir={tmp}/shapes", "--preset=shapes-tiny", "--max_steps=2", "--max_minutes=0",
                 "--batch_size=4", "--eval_every=0", "--progress=False"]
    elif script == "sample.py":
        args += ["--steps", "2", "--out", f"{tmp}/samples", "--no_progress"]
    elif script == "autoencoder.py":  # never overwrite the shipped weights/shapes_ae.safetensors
        # the stage-2 file the README restores from git history: the shipped file has the same layout
        args = [("weights/shapes_ae_c4.safetensors" if a == "out/ae_stage2.safetensors" else a) for a in args]
        args += ["--out", f"{tmp}/ae.safetensors", "--steps", "2", "--batch_size", "4", "--calib_images", "8",
                 "--decoder_steps", "2"]
    elif script == "shapes.py":
        args += ["--out", f"{tmp}/grid.png"]
    return [sys.executable, *args]


def test_quick_start_commands_run(tmp_path):
    cmds = readme_commands("On a laptop: the shapes world")
    assert any(c.startswith("python train.py") for c in cmds) and any(c.startswith("python sample.py") for c in cmds)
    for cmd in cmds:
        r = subprocess.run(tiny(cmd, tmp_path), cwd=ROOT, capture_output=True, text=True, timeout=600,
                           env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert r.returncode == 0, f"{cmd}\n{r.stderr[-2000:]}"
    assert os.path.exists(tmp_path / "samples" / "grid.png") and os.path.exists(tmp_path / "grid.png")


def test_the_two_command_start_runs_the_shipped_model(tmp_path):
    """`pip install -r requirements.txt && python sample.py`: the shipped weights, demo prompts, a grid."""
    cmds = readme_commands("Quick start")
    assert cmds[:2] == ["python sample.py", "python -m pytest"], cmds
    r = subprocess.run(tiny(cmds[0], tmp_path), cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert os.path.exists(tmp_path / "samples" / "grid.png")
