"""data.py: a captioned-image folder encoded once, batches sliced like the shapes stream, training on it."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from data import CACHE, FolderData, build_cache
from model import DCAE_PRESETS, DCAEEncoder, DiTConfig, LinearDiT, save_model
from conftest import build_tiny_gemma
from train import TrainConfig, train


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for i, cap in enumerate(["a photo of a red circle", "a photo of two squares", "a photo of a green triangle"]):
        Image.fromarray(rng.integers(0, 255, (80, 64, 3), dtype=np.uint8)).save(root / f"img{i}.png")
        (root / f"img{i}.txt").write_text(cap)
    torch.manual_seed(0)
    DCAEEncoder(DCAE_PRESETS["shapes-tiny"]).save_pretrained(str(root.parent / "vae.safetensors"))
    gemma = build_tiny_gemma(root.parent / "gemma")
    meta = build_cache(str(root), str(root.parent / "vae.safetensors"), str(gemma), size=64, max_length=8)
    return root, meta, str(gemma), str(root.parent / "vae.safetensors")


def test_cache_holds_every_pair_once(folder):
    root, meta, _, _ = folder
    assert meta["n"] == 3 and os.listdir(root / CACHE) == sorted(os.listdir(root / CACHE))
    mtime = os.path.getmtime(root / CACHE / "shard_00000.safetensors")
    build_cache(str(root), folder[3], folder[2], size=64, max_length=8)  # a second run encodes nothing
    assert os.path.getmtime(root / CACHE / "shard_00000.safetensors") == mtime


def test_batches_are_slices_of_the_global_batch(folder):
    data = FolderData(str(folder[0]), max_length=8)
    full = data.get_batch(4, 6)
    a, b = data.get_batch(4, 6, 0, 2), data.get_batch(4, 6, 1, 2)
    assert full["x"].shape == (6, 32, 2, 2) and full["y"].shape == (6, 8, 32)
    assert torch.equal(torch.cat([a["x"], b["x"]]), full["x"]) and a["prompts"] + b["prompts"] == full["prompts"]
    assert sorted(data.get_batch(0, 3)["prompts"]) == ["0", "1", "2"]  # one epoch: every item once
    y0, m0 = data.null()
    assert m0.sum() == 1  # BOS only


def test_train_on_a_folder(folder, tmp_path):
    root, _, gemma, vae = folder
    torch.manual_seed(0)
    cfg = DiTConfig(in_channels=32, patch_size=1, hidden_size=64, depth=1, cross_heads=2, caption_channels=32,
                    text_encoder=gemma, text_max_length=8, vae=vae)
    save_model(LinearDiT(cfg), str(tmp_path / "init.safetensors"))
    out = train(TrainConfig(out_dir=str(tmp_path / "run"), init_from=str(tmp_path / "init.safetensors"), data=str(root),
                            image_size=64, batch_size=2, max_steps=2, log_every=1, progress=False, dtype="float32"))
    assert len(out["losses"]) == 2 and all(np.isfinite(l) for _, l in out["losses"])


def test_bad_folders(tmp_path):
    with pytest.raises(SystemExit, match="not encoded yet"):
        FolderData(str(tmp_path))
    (tmp_path / "a.png").write_bytes(b"")
    from data import list_pairs
    with pytest.raises(SystemExit, match="no caption file"):
        list_pairs(str(tmp_path))
    with pytest.raises(SystemExit, match="not found"):
        list_pairs(str(tmp_path / "nope"))


def test_the_cache_follows_the_folder_it_was_built_from(folder, tmp_path, capsys):
    _, _, gemma, vae = folder
    rng = np.random.default_rng(1)

    def add(i):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / f"im{i}.png")
        (tmp_path / f"im{i}.txt").write_text(f"a photo of {i} circles")
    add(0), add(1)
    build_cache(str(tmp_path), vae, gemma, size=64, max_length=8)
    assert FolderData(str(tmp_path), max_length=8).get_batch(0, 2)["x"].shape == (2, 32, 2, 2)
    add(2)  # an image added: the cache is stale until encoded again
    with pytest.raises(SystemExit, match="encoded from other images or captions.*python data.py --folder"):
        FolderData(str(tmp_path), max_length=8)
    build_cache(str(tmp_path), vae, gemma, size=64, max_length=8)
    assert FolderData(str(tmp_path), max_length=8).n == 3
    (tmp_path / "im1.txt").write_text("a photo of a new caption")  # a caption changed
    with pytest.raises(SystemExit, match="encoded from other images"):
        FolderData(str(tmp_path), max_length=8)
    build_cache(str(tmp_path), vae, gemma, size=32, max_length=8)  # another size: every shard is encoded again
    data = FolderData(str(tmp_path), max_length=8)
    assert data.meta["size"] == 32 and data.get_batch(0, 3)["x"].shape == (3, 32, 1, 1)


def test_a_bad_image_is_named_and_the_encoded_shards_stay(folder, tmp_path, monkeypatch):
    import data as data_py
    _, _, gemma, vae = folder
    monkeypatch.setattr(data_py, "SHARD", 2)  # two pairs per shard
    rng = np.random.default_rng(2)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / f"im{i}.png")
        (tmp_path / f"im{i}.txt").write_text("a photo of a square")
    build_cache(str(tmp_path), vae, gemma, size=64, max_length=8)
    first = (tmp_path / CACHE / "shard_00000.safetensors").read_bytes()
    png = (tmp_path / "im2.png").read_bytes()
    (tmp_path / "im2.png").write_bytes(png[:len(png) // 2])  # truncated
    with pytest.raises(SystemExit, match=f"image {tmp_path / 'im2.png'} does not read") as e:
        build_cache(str(tmp_path), vae, gemma, size=64, max_length=8)
    assert "\n" not in str(e.value.code)
    assert (tmp_path / CACHE / "shard_00000.safetensors").read_bytes() == first  # kept, not encoded again


def test_data_py_flags_are_checked_before_any_work(tmp_path):
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "data.py", "--folder", str(tmp_path), "--vae", "x", "--text_encoder", "y",
                        "--size", "-8"], cwd=root, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.strip() == "error: --size=-8: must be an integer >= 1"


def test_sanas_buckets_and_the_nearest_one():
    from data import buckets, nearest_bucket
    table = buckets(1024, 32)
    assert len(table) == 40 and table[0] == (512, 2048) and table[20] == (1024, 1024)  # the official 40 at 1024px
    assert buckets(512, 32)[:2] == [(256, 1024), (256, 992)]  # the official ASPECT_RATIO_512: the table halved
    for (h, w), want in [((1024, 1024), (1024, 1024)), ((768, 1344), (768, 1344)), ((1080, 1920), (768, 1344)),
                         ((3000, 1000), (1728, 576)), ((1000, 4000), (512, 2048))]:
        assert nearest_bucket(h, w, table) == want, (h, w)


@pytest.fixture(scope="module")
def bucketed(folder, tmp_path_factory):
    """Eight images of four aspect ratios (h:w 1:4, 1:1, 4:1, 1:2), encoded at base size 128."""
    _, _, gemma, vae = folder
    root = tmp_path_factory.mktemp("buckets")
    rng = np.random.default_rng(3)
    sizes = [(100, 400), (300, 300), (310, 290), (400, 100), (150, 300), (300, 300), (100, 400), (290, 300)]
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / f"im{i}.png")
        (root / f"im{i}.txt").write_text(f"a photo of {i} squares")
    build_cache(str(root), vae, gemma, size=128, max_length=8)
    return root, gemma, vae


def test_images_land_in_their_buckets_and_every_batch_is_one_bucket(bucketed):
    root, _, _ = bucketed
    data = FolderData(str(root), max_length=8)
    # latents of the tiny f32 autoencoder: (64, 256) -> 2x8, (128, 128) -> 4x4, (256, 64) -> 8x2, (96, 192) -> 3x6
    assert [data.items[f"{i}.latent"].shape[1:] for i in range(8)] == [
        (2, 8), (4, 4), (4, 4), (8, 2), (3, 6), (4, 4), (2, 8), (4, 4)]
    assert data.members == [[0, 6], [4], [1, 2, 5, 7], [3]]  # buckets in latent-shape order: 2x8, 3x6, 4x4, 8x2
    seen = []
    for step in range(200):
        batch = data.get_batch(step, 4)
        shape = tuple(batch["x"].shape[1:])
        assert all(tuple(data.items[f"{i}.latent"].shape) == shape for i in map(int, batch["prompts"]))
        seen.append(data.shapes.index(shape))
        a, b = data.get_batch(step, 4, 0, 2), data.get_batch(step, 4, 1, 2)  # two ranks: the same bucket
        assert torch.equal(torch.cat([a["x"], b["x"]]), batch["x"]) and a["prompts"] + b["prompts"] == batch["prompts"]
    counts = [seen.count(k) for k in range(4)]
    assert counts[2] > counts[0] > max(counts[1], counts[3]) > 0  # in proportion to 2 : 1 : 4 : 1
    again = FolderData(str(root), max_length=8)  # a resumed run: the same sequence from any step on
    assert [again.get_batch(s, 4)["prompts"] for s in range(150, 160)] == [data.get_batch(s, 4)["prompts"]
                                                                           for s in range(150, 160)]


def test_training_on_buckets_resumes_exactly(bucketed, tmp_path):
    root, gemma, vae = bucketed
    torch.manual_seed(0)
    cfg = DiTConfig(in_channels=32, patch_size=1, hidden_size=64, depth=1, cross_heads=2, caption_channels=32,
                    text_encoder=gemma, text_max_length=8, vae=vae)
    save_model(LinearDiT(cfg), str(tmp_path / "init.safetensors"))
    run = lambda name, steps, **kw: train(TrainConfig(  # noqa: E731
        out_dir=str(tmp_path / name), init_from=str(tmp_path / "init.safetensors"), data=str(root), batch_size=2,
        max_steps=steps, log_every=1, progress=False, dtype="float32", **kw))
    full = run("a", 6)
    run("b", 3)
    resumed = run("b", 6, resume=True)
    assert full["losses"][3:] == resumed["losses"]


def test_square_only_stays_available(folder, tmp_path):
    _, _, gemma, vae = folder
    rng = np.random.default_rng(4)
    for i, (h, w) in enumerate([(100, 400), (300, 300)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(tmp_path / f"im{i}.png")
        (tmp_path / f"im{i}.txt").write_text("a photo of a square")
    build_cache(str(tmp_path), vae, gemma, size=128, max_length=8, square=True)
    data = FolderData(str(tmp_path), max_length=8)
    assert data.shapes == [(32, 4, 4)] and data.get_batch(0, 2)["x"].shape == (2, 32, 4, 4)
