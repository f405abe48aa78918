"""Early verdicts (sample.py --schedule): best-of-N that judges the x0 previews of all N candidates after a few
sampler steps and finishes only the ones the judge keeps."""
import argparse
import json

import pytest
import torch

import sample
import savila
from flow import integrate, predicted_x0, sigma_grid, step
from model import PRESETS, LinearDiT, load_text_encoder, save_model
from sample import Cost, best_of, candidate_noise, counted, generate, load_decoder, load_judge, sample_images

CPU = torch.device("cpu")
PROMPTS = ["a photo of a red circle", "a photo of two squares", "a photo of a green triangle"]


def run_args(**kw):
    base = dict(size=(32, 32), steps=6, cfg=4.5, shift=1.0, sampler="dpm++", seed=0, batch_size=64, progress=False)
    return argparse.Namespace(**{**base, **kw})


@pytest.fixture(scope="module")
def pipeline():
    torch.manual_seed(0)
    model = LinearDiT(PRESETS["shapes-tiny"]).eval()
    with torch.no_grad():  # a curved field: previews and finished images differ
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model, load_text_encoder("minilm", model.config.text_max_length), load_decoder("", "cpu")


class Brightness:
    """A judge that likes bright images: yes above mean 0, confidence the mean; it runs 3 views of each image."""
    views_run = 0

    def __call__(self, images, prompt):
        self.views_run += 3 * len(images)
        return [(m > 0, m) for m in images.mean((1, 2, 3)).tolist()]


@pytest.mark.parametrize("sampler", ["euler", "dpm++"])
def test_the_preview_is_the_samplers_own_data_prediction(sampler):
    g = torch.Generator().manual_seed(0)
    A = 0.3 * torch.randn(3, 3, generator=g)
    velocity = lambda x, s: torch.einsum("ij,bjhw->bihw", A, x) * (1 + s)  # noqa: E731  a curved field
    noise = torch.randn(2, 3, 4, 4, generator=g)
    seen = {}

    def record(k, x0):
        seen[k] = x0
    out = integrate(velocity, noise, 5, 3.0, sampler, verdict=record)
    sigmas, x, prev = sigma_grid(5, 3.0).tolist(), noise.clone(), None
    for k, (s, t) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        v = velocity(x, s)
        assert torch.equal(seen[k], predicted_x0(x, s, v))  # x - sigma v at the step's own x and sigma
        x, prev = step(sampler, x, v, s, t, prev)
        if sampler == "dpm++" and t > 0:
            assert torch.equal(seen[k], prev[0])  # exactly what DPM-Solver++ keeps as its data prediction
    assert torch.equal(out, x) and (sampler == "euler" or torch.equal(out, seen[4]))  # the last step returns x0


def test_no_early_rounds_is_plain_best_of_n(pipeline):
    model, encoder, decoder = pipeline
    images, picked = sample_images(model, encoder, decoder, PROMPTS, 4, run_args(batch_size=5), CPU, torch.float32)
    assert picked.tolist() == [0, 1, 2, 3] * 3
    y_null, mask_null = encoder.null()
    for i, p in enumerate(PROMPTS):  # each candidate alone, from its own noise
        y, mask = encoder([p])
        for j in range(4):
            x = generate(model, y, mask, y_null, mask_null, candidate_noise(0, i, j, (3, 32, 32))[None], steps=6,
                         cfg=4.5, shift=1.0)
            assert torch.allclose(images[4 * i + j], x[0].clamp(-1, 1), atol=1e-4)  # other batches: rounding only
    judge = Brightness()
    _, picks = best_of(images, PROMPTS, 4, 1, judge)
    assert picks == [savila.tournament(judge(images[4 * i:4 * i + 4], p)) for i, p in enumerate(PROMPTS)]


def test_survivors_finish_as_if_they_had_run_alone(pipeline):
    model, encoder, decoder = pipeline
    full, _ = sample_images(model, encoder, decoder, PROMPTS, 4, run_args(), CPU, torch.float32)
    pruned, picked = sample_images(model, encoder, decoder, PROMPTS, 4, run_args(), CPU, torch.float32,
                                   schedule=((2, 2),), judge=Brightness())
    picked = picked.view(3, 2)
    assert torch.allclose(pruned, full.view(3, 4, 3, 32, 32)[torch.arange(3)[:, None], picked].flatten(0, 1), atol=1e-4)
    # the survivors are the ones the judge keeps on the previews after step 2 (the third velocity)
    y_null, mask_null = encoder.null()
    for i, p in enumerate(PROMPTS):
        y, mask = encoder([p] * 4)
        previews = {}

        def record(k, x0):
            previews[k] = x0.clamp(-1, 1)
        generate(model, y, mask, y_null, mask_null, torch.stack([candidate_noise(0, i, j, (3, 32, 32)) for j in range(4)]),
                 steps=6, cfg=4.5, shift=1.0, verdict=record)
        assert picked[i].tolist() == savila.tournament(Brightness()(previews[2], p), keep=2)


def test_costs_are_counted_as_by_hand(pipeline):
    model, encoder, decoder = pipeline
    judge, cost = Brightness(), Cost()
    images, _ = sample_images(model, encoder, decoder, PROMPTS, 4, run_args(), CPU, torch.float32,
                              schedule=((1, 3), (3, 1)), judge=judge, cost=cost)
    # per prompt: one candidate stops after 2 velocities, two after 4, one runs all 6; x2 for CFG's two halves
    assert cost.dit_forwards == 3 * 2 * (1 * 2 + 2 * 4 + 1 * 6)
    assert cost.decoder_calls == 3 * (4 + 3 + 1)  # previews of the live ones at each round, then the finished one
    assert cost.judge_calls == 3 * 3 * (4 + 3)  # 3 views of each preview
    best_of(images, PROMPTS, 1, 1, counted(judge, cost))
    assert cost.judge_calls == 3 * 3 * (4 + 3 + 1)
    assert cost.sampling_seconds > 0 and cost.judging_seconds > 0


def test_the_cli_writes_its_costs(pipeline, tmp_path):
    ckpt = str(tmp_path / "m.safetensors")
    save_model(pipeline[0], ckpt, train_config={"image_size": 32, "flow_shift": 1.0})
    sample.main(["--ckpt", ckpt, "--prompt", PROMPTS[0], "--best_of", "4", "--schedule", "1:2", "--judge", "checker",
                 "--steps", "6", "--out", str(tmp_path / "o"), "--no_progress"])
    cost = json.load(open(tmp_path / "o" / "cost.json"))
    assert cost["dit_forwards"] == 2 * (2 * 2 + 2 * 6) and cost["decoder_calls"] == 4 + 2
    assert cost["judge_calls"] == 4 + 2  # the checker: one call per image


@pytest.mark.parametrize("argv, said", [
    (["--best_of", "4", "--schedule", "2:8"], "keep 8 at step 2 must be below the 4 candidates alive then"),
    (["--best_of", "8", "--schedule", "20:2"], "step 20 must be above the one before and below --steps 20"),
    (["--best_of", "8", "--steps", "10", "--schedule", "12:2"], "step 12 must be above the one before and below --steps 10"),
    (["--best_of", "8", "--schedule", "4:4,2:2"], "step 2 must be above the one before"),
    (["--best_of", "8", "--schedule", "2:4,4:4"], "keep 4 at step 4 must be below the 4 candidates"),
    (["--best_of", "8", "--keep", "2", "--schedule", "2:1"], "at least --keep 2"),
    (["--best_of", "8", "--schedule", "2-4"], "argument --schedule: '2-4': give step:keep pairs"),
    (["--best_of", "8", "--schedule", "2:4", "--eval", "--curve"], "--curve and --candidates need them all")])
def test_bad_schedules_are_one_line_errors(argv, said, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        sample.main(argv + ["--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and said in err and "\n" not in err, err


def test_a_vlm_judges_the_previews_at_real_scale(pipeline, tiny_llava):
    model, encoder, decoder = pipeline
    folder, _ = tiny_llava
    judge, cost = load_judge(str(folder), "cpu"), Cost()
    images, picked = sample_images(model, encoder, decoder, PROMPTS[:2], 4, run_args(), CPU, torch.float32,
                                   schedule=((1, 2),), judge=judge, cost=cost)
    assert images.shape == (4, 3, 32, 32) and cost.judge_calls == 2 * 4 and cost.decoder_calls == 2 * (4 + 2)
    assert all(0 <= j < 4 for j in picked.tolist())


def test_a_judge_on_one_view_is_the_cheap_preview_judge():
    import shapes
    images = shapes.render_batch([shapes.as_prompt(p).spec for p in PROMPTS[:1] * 4], rng=0)
    one, every = load_judge(sample.DEFAULT_PREVIEW_JUDGE, "cpu"), load_judge(sample.DEFAULT_PREVIEW_JUDGE[:-2], "cpu")
    costs = Cost(), Cost()
    counted(one, costs[0])(images, PROMPTS[0])
    counted(every, costs[1])(images, PROMPTS[0])
    assert costs[0].judge_calls == 4 and costs[1].judge_calls == 4 * 10  # no relation: the converse views are skipped
    z = one.logits(images, PROMPTS[0])
    assert torch.allclose(z, one.net(savila.judge_input(images, 32), *one.captions([PROMPTS[0]] * 4)), atol=1e-6)
