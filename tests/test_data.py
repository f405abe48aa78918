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
