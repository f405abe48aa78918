"""model.py's writers: a LinearDiT saved in the diffusers layout runs the same in diffusers (the reference), and
every layout reads back exactly; the official file has the official model's keys; grow.py, prune.py and
`python model.py --export` write any layout."""
import dataclasses
import json
import os
import runpy
import sys

import pytest
import torch

import model as model_py
from grow import grow
from model import DiTConfig, LinearDiT, save_model
from conftest import trained_like

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# cross-attention qk-norm eps 1e-5, diffusers' own (official 1e-6; model.py's docstring), so that the comparisons
# below measure the export alone: at 1e-6 the eps itself shows, the more so the smaller the keys (a fresh model's
# caption norm starts at 0.01)
TINY = DiTConfig(in_channels=4, patch_size=1, hidden_size=64, depth=2, linear_head_dim=32, cross_heads=2,
                 caption_channels=24, qk_norm=True, cross_norm_eps=1e-5)


def inputs(cfg, B=2, H=8, W=6, L=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, cfg.in_channels, H, W, generator=g)
    y = torch.randn(B, L, cfg.caption_channels, generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[0, 4:] = 0
    return x, torch.tensor([999.0, 250.0])[:B], y, mask


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def diffusers_error(model, folder, cfg=None):
    """Relative error between our model and diffusers' SanaTransformer2DModel loaded from `folder`."""
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.SanaTransformer2DModel.from_pretrained(str(folder)).eval()
    x, t, y, mask = inputs(cfg or model.config)
    with torch.no_grad():
        want = ref(x, encoder_hidden_states=y, timestep=t, encoder_attention_mask=mask).sample
        return rel_err(model(x, t, y, mask), want)


def assert_same_model(a, b):
    assert b.config == a.config
    sd = b.state_dict()
    assert sd.keys() == a.state_dict().keys()
    assert all(torch.equal(v, sd[k]) for k, v in a.state_dict().items())
    x, t, y, mask = inputs(a.config)
    with torch.no_grad():
        assert torch.equal(a(x, t, y, mask), b(x, t, y, mask))


# ---- diffusers reads what we write ------------------------------------------------------------------------

@pytest.mark.parametrize("change", [dict(qk_norm=False), dict(), dict(patch_size=2),
                                    dict(use_pe=True, pe_interpolation=2.0, pe_base_size=8)],
                         ids=["no-qk-norm", "qk-norm", "patch-2", "pos-embed"])
def test_diffusers_runs_our_export(tmp_path, change):
    model = trained_like(dataclasses.replace(TINY, **change))
    model.save_pretrained(tmp_path / "d")
    assert sorted(os.listdir(tmp_path / "d")) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert diffusers_error(model, tmp_path / "d") < 1e-4


def test_grown_model_in_diffusers_layout_through_grow_py(tmp_path, monkeypatch):
    src = trained_like(dataclasses.replace(TINY, qk_norm=False, depth=3))
    save_model(src, str(tmp_path / "src.safetensors"))
    out = tmp_path / "grown"
    monkeypatch.setattr(sys, "argv", ["grow.py", "--src", str(tmp_path / "src.safetensors"), "--depth", "5",
                                      "--drop_last", "1", "--layout", "diffusers", "--out", str(out)])
    torch.manual_seed(1)  # the new blocks' random init
    runpy.run_path(os.path.join(REPO, "grow.py"), run_name="__main__")
    back = LinearDiT.from_pretrained(str(out)).eval()
    torch.manual_seed(1)
    assert_same_model(grow(src, 5, drop_last=1).eval(), back)  # blocks 2-4 new: qk-norm weights 1, projections 0
    assert back.meta["grow_init"] == "partial"
    assert diffusers_error(back, out) < 1e-4


def test_pruned_model_in_diffusers_layout_through_prune_py(tmp_path, tiny_gemma):
    from prune import main, prune

    cfg = dataclasses.replace(TINY, depth=3, caption_channels=32, text_max_length=12)  # tiny Gemma-2's states
    big = trained_like(cfg)
    ckpt, out, prompts = tmp_path / "m.safetensors", tmp_path / "pruned", tmp_path / "prompts.txt"
    save_model(big, str(ckpt))
    prompts.write_text("a photo of a red circle\na photo of two squares\n")
    main(["--ckpt", str(ckpt), "--keep", "0,2", "--out", str(out), "--layout", "diffusers", "--prompts", str(prompts),
          "--text_encoder", str(tiny_gemma), "--image_size", "256", "--timesteps", "2", "--batch_size", "2",
          "--progress", "False"])
    small = LinearDiT.from_pretrained(str(out)).eval()
    assert_same_model(prune(big, [0, 2]).eval(), small)
    assert json.loads(small.meta["kept_blocks"]) == [0, 2]
    assert diffusers_error(small, out) < 1e-4


# ---- every layout reads back exactly --------------------------------------------------------------------

@pytest.mark.parametrize("layout,name", [("diffusers", "d"), ("official", "o.pth"), ("official", "o.safetensors"),
                                         ("ours", "m.safetensors")])
def test_export_reads_back_exactly(tmp_path, layout, name):
    cfg = dataclasses.replace(TINY, cross_norm_eps=1e-6, text_encoder="minilm", vae="", text_max_length=16)
    model = trained_like(cfg)  # a width (64) and fields that only the stored config can tell
    model.save_pretrained(tmp_path / name, layout, step=7)
    back = LinearDiT.from_pretrained(str(tmp_path / name)).eval()
    assert_same_model(model, back)
    assert back.meta["step"] == "7"
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]


def test_sharded_export_reloads_in_ours_and_in_diffusers(tmp_path):
    model = trained_like(TINY)
    folder = tmp_path / "d"
    model.save_pretrained(folder, max_shard_size=40_000)  # bytes: a few tensors per shard
    files = sorted(os.listdir(folder))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) >= 3 and "diffusion_pytorch_model.safetensors" not in files
    assert shards[0] == f"diffusion_pytorch_model-00001-of-{len(shards):05d}.safetensors"
    index = json.load(open(folder / "diffusion_pytorch_model.safetensors.index.json"))
    assert sorted(set(index["weight_map"].values())) == shards
    assert_same_model(model, LinearDiT.from_pretrained(str(folder)).eval())
    assert diffusers_error(model, folder) < 1e-4
    model.save_pretrained(folder)  # unsharded into the same folder: the old shards and index go
    assert sorted(os.listdir(folder)) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert_same_model(model, LinearDiT.from_pretrained(str(folder)).eval())


def test_diffusers_folder_exports_back_to_its_own_config(tmp_path):
    """Fields DiTConfig does not have (sample_size, dropout, ...) are written as the source had them."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    src = diffusers.SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=32, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=32, cross_attention_dim=64, caption_channels=24,
        sample_size=16, patch_size=2, dropout=0.1, guidance_embeds_scale=0.3, qk_norm="rms_norm_across_heads")
    src.save_pretrained(tmp_path / "src")
    ours = LinearDiT.from_pretrained(str(tmp_path / "src"))
    ours.save_pretrained(tmp_path / "out")
    for layout, out in [("official", "o.pth"), ("ours", "o.safetensors")]:  # and through our other layouts
        ours.save_pretrained(tmp_path / out, layout)
        LinearDiT.from_pretrained(str(tmp_path / out)).save_pretrained(tmp_path / f"via_{layout}")
    want = json.load(open(tmp_path / "src" / "config.json"))
    for folder in ("out", "via_official", "via_ours"):
        got = json.load(open(tmp_path / folder / "config.json"))
        assert {k: v for k, v in got.items() if k != "_diffusers_version"} == \
               {k: v for k, v in want.items() if k not in ("_diffusers_version", "_name_or_path")}, folder
    back = diffusers.SanaTransformer2DModel.from_pretrained(str(tmp_path / "out"))
    sd = back.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in src.state_dict().items())


# ---- the official layout ----------------------------------------------------------------------------------

def official_keys(depth, qk_norm):
    """The official SanaMS state_dict() names (shared/reference/sana-official.md, "State-dict keys"), written out
    independently of model.py."""
    top = ["pos_embed", "x_embedder.proj.weight", "x_embedder.proj.bias", "t_embedder.mlp.0.weight",
           "t_embedder.mlp.0.bias", "t_embedder.mlp.2.weight", "t_embedder.mlp.2.bias", "t_block.1.weight",
           "t_block.1.bias", "y_embedder.y_embedding", "y_embedder.y_proj.fc1.weight", "y_embedder.y_proj.fc1.bias",
           "y_embedder.y_proj.fc2.weight", "y_embedder.y_proj.fc2.bias", "attention_y_norm.weight",
           "final_layer.scale_shift_table", "final_layer.linear.weight", "final_layer.linear.bias"]
    block = ["scale_shift_table", "attn.qkv.weight", "attn.proj.weight", "attn.proj.bias",
             "cross_attn.q_linear.weight", "cross_attn.q_linear.bias", "cross_attn.kv_linear.weight",
             "cross_attn.kv_linear.bias", "cross_attn.proj.weight", "cross_attn.proj.bias",
             "mlp.inverted_conv.conv.weight", "mlp.inverted_conv.conv.bias", "mlp.depth_conv.conv.weight",
             "mlp.depth_conv.conv.bias", "mlp.point_conv.conv.weight"]
    if qk_norm:
        block += ["attn.q_norm.weight", "attn.k_norm.weight", "cross_attn.q_norm.weight", "cross_attn.k_norm.weight"]
    return set(top) | {f"blocks.{i}.{k}" for i in range(depth) for k in block}


@pytest.mark.parametrize("qk_norm", [False, True])
def test_official_file_has_the_official_state_dict_names(tmp_path, qk_norm):
    from safetensors.torch import load_file

    cfg = dataclasses.replace(TINY, qk_norm=qk_norm, text_max_length=300)
    model = trained_like(cfg)
    model.save_pretrained(tmp_path / "o.pth", "official", train_config={"image_size": 256})
    model.save_pretrained(tmp_path / "o.safetensors", "official")
    obj = torch.load(tmp_path / "o.pth", map_location="cpu", weights_only=True)
    sd = obj["state_dict"]
    assert set(sd) == official_keys(cfg.depth, qk_norm) == set(load_file(tmp_path / "o.safetensors"))
    D, H = cfg.hidden_size, cfg.mlp_hidden
    assert sd["pos_embed"].shape == (1, 8 * 8, D)  # 256 px / 32 (DC-AE) = 8: the trained grid
    assert sd["y_embedder.y_embedding"].shape == (300, cfg.caption_channels)
    assert sd["blocks.0.attn.qkv.weight"].shape == (3 * D, D)
    assert sd["blocks.1.cross_attn.kv_linear.bias"].shape == (2 * D,)
    assert sd["blocks.0.mlp.inverted_conv.conv.weight"].shape == (2 * H, D, 1, 1)
    # the official loader: drop pos_embed, replace y_embedding by the null caption, load the rest
    ours = {k: v for k, v in sd.items() if k not in ("pos_embed", "y_embedder.y_embedding")}
    assert all(torch.equal(v, ours[k]) for k, v in model.state_dict().items())


# ---- python model.py --export ---------------------------------------------------------------------------

def export_cli(monkeypatch, *args):
    monkeypatch.setattr(sys, "argv", ["model.py", *map(str, args)])
    runpy.run_path(model_py.__file__, run_name="__main__")


def test_export_cli_converts_between_layouts(tmp_path, monkeypatch, capsys):
    model = trained_like(dataclasses.replace(TINY, cross_norm_eps=1e-6))
    save_model(model, str(tmp_path / "m.safetensors"), step=3)
    export_cli(monkeypatch, "--export", tmp_path / "m.safetensors", "--layout", "official", "--out", tmp_path / "o.pth")
    export_cli(monkeypatch, "--export", tmp_path / "o.pth", "--layout", "diffusers", "--out", tmp_path / "d")
    export_cli(monkeypatch, "--export", tmp_path / "d", "--layout", "ours", "--out", tmp_path / "back.safetensors")
    assert "wrote" in capsys.readouterr().out
    back = LinearDiT.from_pretrained(str(tmp_path / "back.safetensors")).eval()
    assert_same_model(model, back)
    assert back.meta["step"] == "3" and back.meta["exported_from"] == str(tmp_path / "d")


def test_export_cli_one_line_errors(tmp_path, monkeypatch, capsys):
    save_model(trained_like(TINY), str(tmp_path / "m.safetensors"))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    cases = [(["--layout", "onnx", "--out", tmp_path / "a"], "--layout"),
             (["--layout", "diffusers"], "--out"),
             (["--layout", "official", "--out", tmp_path / "o.bin"], ".pth or .safetensors"),
             (["--layout", "diffusers", "--out", tmp_path / "full"], "refusing to overwrite"),
             (["--layout", "official", "--out", tmp_path / "m.safetensors"], "refusing to overwrite"),
             (["--layout", "ours", "--out", tmp_path / "no" / "m.safetensors"], "folder does not exist")]
    for args, msg in cases:
        with pytest.raises(SystemExit) as e:
            export_cli(monkeypatch, "--export", tmp_path / "m.safetensors", *args)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and msg in err, err
    with pytest.raises(SystemExit) as e:
        export_cli(monkeypatch, "--export", tmp_path / "nope.pth", "--layout", "ours", "--out", tmp_path / "n.pth")
    assert e.value.code == 2 and "no such file" in capsys.readouterr().err
    assert (tmp_path / "full" / "x").read_text() == "keep me"
    assert sorted(os.listdir(tmp_path)) == ["full", "m.safetensors"]  # nothing written
