"""The README's commands: the quick start runs as printed (with tiny settings), and every other command's
flags are ones its script accepts, so the front page cannot drift from the code."""
import functools
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ("README.md", "ABLATIONS.md")


def commands(doc="README.md", section=None):
    """The `python ...` / `torchrun ...` commands of the bash blocks of `doc` (under heading `section` if given)."""
    text = open(os.path.join(ROOT, doc)).read()
    if section:
        text = text.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    blocks = [b.replace("\\\n", " ") for b in re.findall(r"```bash\n(.*?)```", text, re.S)]  # join "\" continuations
    inline = re.findall(r"`((?:python|torchrun) [^`]+)`", text) if section is None else []
    lines = [l.split("  #")[0].split(" # ")[0].strip() for block in blocks for l in block.splitlines()] + inline
    cmds = [c.strip() for l in lines for c in l.split("&&")]  # "pip install ... && python sample.py"
    return [c for c in cmds if c.startswith(("python ", "torchrun "))]


def script_and_flags(cmd):
    """'python x.py --a 1 --b=2' or 'torchrun ... x.py --a' -> ('x.py', ['a', 'b']); (None, []) for python -m."""
    args = shlex.split(cmd.replace("<", "").replace(">", ""))
    scripts = [i for i, a in enumerate(args) if a.endswith(".py")]
    if args[1] == "-m" or not scripts:
        return None, []
    return args[scripts[0]], [a[2:].split("=")[0] for a in args[scripts[0] + 1:] if a.startswith("--")]


@functools.lru_cache(maxsize=None)
def help_text(script):
    r = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{script} --help failed:\n{r.stderr[-2000:]}"
    return r.stdout


def test_every_documented_flag_exists():
    cmds = [c for doc in DOCS for c in commands(doc)]
    assert len(cmds) > 20, cmds
    for cmd in cmds:
        script, flags = script_and_flags(cmd)
        if script is None:
            continue
        assert os.path.isfile(os.path.join(ROOT, script)), cmd
        for config in (a for a in shlex.split(cmd) if a.startswith("config/")):
            assert os.path.isfile(os.path.join(ROOT, config)), f"{cmd}: no {config}"
        text = help_text(script)
        for flag in flags:
            assert re.search(rf"--{re.escape(flag)}\b", text), f"{cmd}: {script} has no --{flag}"


def tiny(cmd, tmp):
    """The same command, pointed at tmp and shrunk: a 2-step run of the tiny preset instead of minutes."""
    args = shlex.split(cmd)[1:]
    args = [re.sub(r"\bout/[\w.-]+/", f"{tmp}/shapes/", a) for a in args]  # every run folder: the tiny run's
    script = args[0]
    if script == "train.py":
        args += [f"--out_dir={tmp}/shapes", "--preset=shapes-tiny", "--max_steps=2", "--batch_size=4",
                 "--eval_every=0", "--progress=False"]
    elif script == "sample.py":
        args += ["--steps", "2", "--out", f"{tmp}/samples", "--no_progress"]
    return [sys.executable, *args]


@pytest.mark.parametrize("i", range(4))
def test_quick_start_runs_as_printed(tmp_path, i):
    cmds = commands("README.md", "Quick start")
    assert cmds[:2] == ["python sample.py", "python -m pytest"], cmds
    assert cmds[2].startswith("python train.py") and cmds[3].startswith("python sample.py --ckpt out/shapes10/")
    if i == 1:
        return  # the test command itself
    todo = [cmds[i]] if i != 3 else cmds[2:4]  # --eval scores the model the train command wrote
    for cmd in todo:
        r = subprocess.run(tiny(cmd, tmp_path), cwd=ROOT, capture_output=True, text=True, timeout=600,
                           env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert r.returncode == 0, f"{cmd}\n{r.stderr[-2000:]}"
    assert os.path.exists(tmp_path / "samples" / "grid.png") or i == 2
