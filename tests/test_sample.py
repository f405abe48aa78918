"""sample.py: the flow samplers against exact answers, guidance, the real text path, the CLI's errors."""
import json
import os
import subprocess
import sys

import pytest
import torch

import sample
import savila
import shapes
from model import PRESETS, DiTConfig, LinearDiT, TextEncoder, save_model
from flow import sigma_grid
from sample import generate, guided_velocity

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class StraightField(torch.nn.Module):
    """The exact velocity of straight paths into x0: v(x, sigma) = (x - x0) / sigma."""

    def __init__(self, x0):
        super().__init__()
        self.x0 = x0

    def forward(self, x, t, y, mask):
        return (x - torch.cat([self.x0] * (x.shape[0] // self.x0.shape[0]))) / (t[:, None, None, None] / 1000)


def null_text(B=2, L=3, D=4):
    return torch.zeros(B, L, D), torch.ones(B, L, dtype=torch.long), torch.zeros(1, L, D), torch.ones(1, L, dtype=torch.long)


@pytest.mark.parametrize("sampler", ["euler", "dpm++"])
def test_sampler_lands_on_the_exact_endpoint_of_a_straight_field(sampler):
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    s0 = sigma_grid(10, 3.0)[0].item()
    x_start = (1 - s0) * x0 + s0 * noise  # on the path at the first sigma
    y, m, yn, mn = null_text()
    out = generate(StraightField(x0), y, m, yn, mn, x_start, steps=10, cfg=4.5, shift=3.0, sampler=sampler)
    assert torch.allclose(out, x0, atol=1e-5)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    cfg = DiTConfig(in_channels=3, patch_size=2, hidden_size=64, depth=2, cross_heads=2, caption_channels=8, qk_norm=True)
    model = LinearDiT(cfg).eval()
    with torch.no_grad():  # a trained-looking, strongly curved field
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


class GaussianField(torch.nn.Module):
    """The exact velocity when the data is N(mu, s^2): E[x0 | x_sigma] is linear in x, the paths are curved."""

    def __init__(self, mu=1.0, s=0.3):
        super().__init__()
        self.mu, self.s = mu, s

    def forward(self, x, t, y, mask):
        sig = (t / 1000)[:, None, None, None]
        a = 1 - sig
        x0 = self.mu + a * self.s**2 / (a**2 * self.s**2 + sig**2) * (x - a * self.mu)
        eps = (x - a * x0) / sig
        return eps - x0


def test_dpm_solver_beats_euler_at_20_steps():
    noise = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    y, m, yn, mn = null_text(B=4)
    field = GaussianField()
    ref = generate(field, y, m, yn, mn, noise, steps=1000, cfg=1.0, shift=3.0, sampler="euler")
    err = {s: (generate(field, y, m, yn, mn, noise, steps=20, cfg=1.0, shift=3.0, sampler=s) - ref).norm().item()
           for s in ("euler", "dpm++")}
    assert err["dpm++"] < 0.7 * err["euler"]  # measured 0.96 vs 1.69


def test_guidance_touches_every_channel():
    model = tiny_model()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 8, 8, generator=g)
    y, m = torch.randn(2, 5, 8, generator=g), torch.ones(2, 5, dtype=torch.long)
    yn, mn = torch.randn(2, 5, 8, generator=g), torch.ones(2, 5, dtype=torch.long)
    with torch.no_grad():
        v_text = model(x, torch.full((2,), 500.0), y, m)
        guided = guided_velocity(model, x, 0.5, y, m, yn, mn, cfg=4.5)
    diff = (guided - v_text).abs().amax(dim=(0, 2, 3))  # per channel
    assert (diff > 1e-4).all()
    with torch.no_grad():
        assert torch.allclose(guided_velocity(model, x, 0.5, y, m, yn, mn, cfg=1.0), v_text, rtol=1e-4, atol=1e-4)


def test_gemma_text_path_with_instruction_slicing(tmp_path):
    from conftest import build_tiny_gemma
    folder = build_tiny_gemma(tmp_path / "gemma")
    chi = "given a user prompt describe a photo of a circle: "  # words the tiny vocabulary knows
    enc = TextEncoder(str(folder), max_length=8, chi_prompt=chi)
    y, mask = enc(["a photo of a red circle", "a photo of two squares"])
    assert y.shape == (2, 8, enc.dim) and mask[:, 0].eq(1).all()
    # by hand: the whole chi + prompt sequence through Gemma, then BOS + the last 7 positions
    n_chi = len(enc.tokenizer.encode(chi))
    tok = enc.tokenizer([chi + "a photo of a red circle"], max_length=n_chi + 8 - 2, padding="max_length",
                        truncation=True, return_tensors="pt")
    with torch.no_grad():
        full = enc.model(**tok).last_hidden_state[0]
    assert torch.allclose(y[0], full[[0] + list(range(-7, 0))], atol=1e-6)
    assert mask[0].tolist() == tok.attention_mask[0, [0] + list(range(-7, 0))].tolist()
    y0, m0 = enc.null()
    assert m0[0].sum() == 1  # the empty caption: BOS only, no instruction


def run_cli(*args):
    r = subprocess.run([sys.executable, "sample.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    return r.returncode, r.stderr.strip().splitlines()


def test_size_takes_width_x_height(tmp_path):
    from PIL import Image
    torch.manual_seed(0)
    ckpt = str(tmp_path / "tiny.safetensors")
    save_model(LinearDiT(PRESETS["shapes-tiny"]), ckpt, train_config={"image_size": 32, "flow_shift": 1.0})
    for size, want in (("64x32", (64, 32)), ("24x48", (24, 48)), ("40", (40, 40))):
        sample.main(["--ckpt", ckpt, "--prompt", "a photo of a red circle", "--size", size, "--steps", "2",
                     "--out", str(tmp_path / size), "--no_progress"])
        assert Image.open(tmp_path / size / "00000.png").size == want  # PIL: (width, height)


def test_cli_end_to_end_and_bad_input(tmp_path):
    torch.manual_seed(0)
    ckpt = str(tmp_path / "tiny.safetensors")
    save_model(LinearDiT(PRESETS["shapes-tiny"]), ckpt, train_config={"image_size": 32, "flow_shift": 1.0})
    sample.main(["--ckpt", ckpt, "--prompt", "a photo of a red circle", "--prompt", "a photo of two squares",
                 "--best_of", "3", "--keep", "1", "--judge", "checker", "--steps", "3", "--out", str(tmp_path / "o"),
                 "--no_progress"])
    files = sorted(os.listdir(tmp_path / "o"))
    assert files == ["00000.png", "00001.png", "cost.json", "grid.png", "index.jsonl"]
    (tmp_path / "bad.txt").write_text("\n\n")
    for args, pattern in [(["--ckpt", str(tmp_path / "nope.safetensors")], "not found"),
                          (["--ckpt", ckpt, "--prompts", str(tmp_path / "bad.txt")], "holds no prompts"),
                          (["--ckpt", ckpt, "--prompts", str(tmp_path / "missing.txt")], "not found"),
                          (["--ckpt", ckpt, "--best_of", "2", "--keep", "3"], "keep"),
                          (["--ckpt", ckpt, "--size", "30"], "30x30: each side must be a multiple of 8"),
                          (["--ckpt", ckpt, "--size", "64x36"], "64x36: each side must be a multiple of 8"),
                          (["--ckpt", ckpt, "--best_of", "2", "--judge", str(tmp_path / "j.safetensors")], "SaVILA")]:
        with pytest.raises(SystemExit, match=pattern) as e:
            sample.main(args + ["--no_progress", "--steps", "2"])
        assert "\n" not in str(e.value)


def tiny_causal_lm(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import Gemma2Config, Gemma2ForCausalLM, PreTrainedTokenizerFast
    words = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "Yes", "No", "a", "photo", "of",
             "red", "circle", "user", "model"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    t = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                unk_token="<unk>", additional_special_tokens=["<start_of_turn>", "<end_of_turn>"])
    t.chat_template = ("{% for m in messages %}<start_of_turn>{{ m['role'] }} {{ m['content'] }}<end_of_turn>"
                       "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model {% endif %}")
    torch.manual_seed(0)
    lm = Gemma2ForCausalLM(Gemma2Config(vocab_size=len(words), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                        max_position_embeddings=512, pad_token_id=0, eos_token_id=1, bos_token_id=2))
    lm.save_pretrained(tmp_path / "lm")
    t.save_pretrained(tmp_path / "lm")
    return str(tmp_path / "lm")


def test_safety_check_and_rewrite_on_a_tiny_lm(tmp_path):
    path = tiny_causal_lm(tmp_path)
    p = sample.unsafe_probability(["a photo of a red circle"], path, "cpu")
    assert len(p) == 1 and 0.0 <= p[0] <= 1.0
    out = sample.rewrite_prompts(["a photo of a red circle"], path, "cpu", max_new_tokens=4)
    assert len(out) == 1 and isinstance(out[0], str) and out[0]
    torch.manual_seed(0)
    ckpt = str(tmp_path / "tiny.safetensors")
    save_model(LinearDiT(PRESETS["shapes-tiny"]), ckpt)
    with pytest.raises(SystemExit, match="refused"):  # threshold 0: any probability above it: everything is refused
        sample.main(["--ckpt", ckpt, "--prompt", "a photo of a red circle", "--safety_check", path,
                     "--safety_threshold", "0", "--no_progress"])


def test_curve_saves_candidates_and_rejudges_them(tmp_path, capsys):
    """--eval --curve --candidates FILE: the first run samples and writes FILE, a second run reads it back, and
    the two curves agree (the same images, the same judge)."""
    torch.manual_seed(0)
    ckpt = str(tmp_path / "tiny.safetensors")
    save_model(LinearDiT(PRESETS["shapes-tiny"]), ckpt, train_config={"image_size": 32, "flow_shift": 1.0})
    cands = str(tmp_path / "c" / "cands.pt")
    common = ["--ckpt", ckpt, "--eval", "--curve", "--best_of", "2", "--judge", "checker", "--steps", "2",
              "--candidates", cands, "--no_progress"]
    sample.main(common + ["--out", str(tmp_path / "a")])
    assert "sampled" in capsys.readouterr().out and os.path.exists(cands)
    sample.main(common + ["--out", str(tmp_path / "b")])
    assert "read 712 candidates" in capsys.readouterr().out  # 89 eval prompts x 4 x 2
    curves = [json.load(open(tmp_path / d / "scaling.json")) for d in "ab"]
    assert [r["N"] for r in curves[0]] == [1, 2]
    assert [(r["judge"], r["checker"]) for r in curves[0]] == [(r["judge"], r["checker"]) for r in curves[1]]
    assert all(r["agreement"]["accuracy"] == 1.0 for r in curves[0])  # the checker as judge agrees with itself
    (tmp_path / "junk.pt").write_text("not a tensor file")
    junk = [a if a != cands else str(tmp_path / "junk.pt") for a in common]
    with pytest.raises(SystemExit, match="not a candidates file"):
        sample.main(junk + ["--out", str(tmp_path / "x")])
    four = [a if a != "2" else "4" for a in common]  # --best_of 4 (and --steps 4) against a file of best_of 2
    for argv, pattern in [(four, "holds 712 candidates"), ([a for a in common if a != "--curve"], "needs --eval --curve")]:
        with pytest.raises(SystemExit, match=pattern) as e:
            sample.main(argv + ["--out", str(tmp_path / "x")])
        assert "\n" not in str(e.value)


def test_agreement_counts_by_hand():
    """4 images the checker passes, 2 it fails; the judge says yes to 3 of the 4 and to 1 of the 2."""
    a = savila.agreement([1, 1, 1, 0, 1, 0], [1, 1, 1, 1, 0, 0], [shapes.all_prompts("colors")[0].text] * 6)
    assert a["accuracy"] == pytest.approx(4 / 6) and a["balanced"] == pytest.approx((3 / 4 + 1 / 2) / 2)
    assert a["judge_yes"] == pytest.approx(4 / 6) and a["checker_yes"] == pytest.approx(4 / 6)
