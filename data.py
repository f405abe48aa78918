"""
Real data for train.py: a folder of captioned images, encoded once to DC-AE latents and text states.

    python data.py --folder my_images --vae mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers \
        --text_encoder Efficient-Large-Model/gemma-2-2b-it --size 1024
    torchrun --nproc_per_node 8 train.py config/sana1.6b_finetune.py --init_from ... --data my_images

The folder holds pairs name.jpg|png + name.txt. Aspect-ratio buckets, as SANA trains (official
ASPECT_RATIO_1024 and AspectRatioBatchSampler): each image goes to the bucket of SANA's table, scaled to --size,
whose height/width is nearest its own (40 buckets at 1024px, e.g. 1024x1024, 768x1344), is resized to cover it
(bicubic), center-cropped, mapped to [-1, 1] and encoded by the DC-AE encoder: latent = encoder(image) *
scaling_factor, deterministically, as the official code does (--square: every image to size x size). Each
caption goes through the text encoder with SANA's instruction prefix (Gemma-2), and only its real tokens are
kept. Everything lands in folder/.nanosana_cache/shard_*.safetensors, so training never runs the autoencoder or
Gemma (the official advice for large images, NVlabs/Sana#270). A training batch is one bucket: the bucket of a
step is drawn in proportion to the buckets' sizes, a pure function of (seed, step) like the rest of train.py.

The cache records what it was built from: the settings (vae, text encoder, size, caption length) and, per shard,
each image's name, byte size and mtime and its caption's hash. Rerunning data.py re-encodes exactly the shards
whose sources changed; train.py refuses a cache that no longer matches the folder. An image that does not read
stops the run with its name; the shards encoded before it are kept.
"""

import glob
import hashlib
import json
import os

import numpy as np
import torch
from safetensors.torch import load_file

from model import ArgumentParser, DCAEEncoder, atomic_save_file, check_flags, load_text_encoder, resolve

CACHE = ".nanosana_cache"
SHARD = 256  # items per cache file

# SANA's 40 buckets at 1024px, (height, width): the official ASPECT_RATIO_1024 (diffusion/data/datasets/utils.py)
BUCKETS_1024 = [(512, 2048), (512, 1984), (512, 1920), (512, 1856), (576, 1792), (576, 1728), (576, 1664),
                (640, 1600), (640, 1536), (704, 1472), (704, 1408), (704, 1344), (768, 1344), (768, 1280),
                (832, 1216), (832, 1152), (896, 1152), (896, 1088), (960, 1088), (960, 1024), (1024, 1024),
                (1024, 960), (1088, 960), (1088, 896), (1152, 896), (1152, 832), (1216, 832), (1280, 768),
                (1344, 768), (1408, 704), (1472, 704), (1536, 640), (1600, 640), (1664, 576), (1728, 576),
                (1792, 576), (1856, 512), (1920, 512), (1984, 512), (2048, 512)]


def buckets(size, multiple):
    """SANA's table scaled to `size` (512: the official ASPECT_RATIO_512, halved), each side rounded to a multiple
    of `multiple` (the autoencoder's factor); sizes that coincide after rounding are kept once."""
    table = []
    for h, w in BUCKETS_1024:
        hw = tuple(max(multiple, round(v * size / 1024 / multiple) * multiple) for v in (h, w))
        table += [hw] if hw not in table else []
    return table


def nearest_bucket(height, width, table):
    """The bucket whose height/width is nearest the image's (the official get_closest_ratio)."""
    return min(table, key=lambda hw: abs(hw[0] / hw[1] - height / width))


def list_pairs(folder):
    """Sorted (image path, caption) pairs; a one-line error if there are none or a caption is missing."""
    if not os.path.isdir(folder):
        raise SystemExit(f"error: data folder {folder} not found")
    images = sorted(p for ext in ("jpg", "jpeg", "png", "webp") for p in glob.glob(os.path.join(folder, f"*.{ext}")))
    if not images:
        raise SystemExit(f"error: {folder} holds no .jpg/.png images (expected name.jpg + name.txt pairs)")
    pairs = []
    for p in images:
        txt = os.path.splitext(p)[0] + ".txt"
        if not os.path.isfile(txt):
            raise SystemExit(f"error: {p} has no caption file {txt}")
        pairs.append((p, open(txt, encoding="utf-8").read().strip()))
    return pairs


def sources(pairs):
    """What a cache entry was encoded from: [name, bytes, mtime_ns, caption hash] per pair."""
    return [[os.path.basename(p), os.stat(p).st_size, os.stat(p).st_mtime_ns, hashlib.sha1(c.encode()).hexdigest()[:16]]
            for p, c in pairs]


def fingerprint(settings, pairs):
    return hashlib.sha1(json.dumps([settings, sources(pairs)]).encode()).hexdigest()


def open_image(path, pixels=True):
    """The image (its pixels read, or only its header); a file that does not read stops with its name."""
    from PIL import Image
    try:
        im = Image.open(path)
        return im.convert("RGB") if pixels else im
    except (OSError, ValueError) as e:  # PIL: unknown format, truncated data
        raise SystemExit(f"error: image {path} does not read ({e}); fix or remove it and its caption, then rerun "
                         f"(the shards encoded so far are kept)") from None


def load_image(path, hw):
    """-> float (3, h, w) in [-1, 1]: resize to cover h x w (bicubic), center crop."""
    from PIL import Image
    (h, w), im = hw, open_image(path)
    s = max(h / im.height, w / im.width)
    im = im.resize((max(w, round(im.width * s)), max(h, round(im.height * s))), Image.BICUBIC)
    left, top = (im.width - w) // 2, (im.height - h) // 2
    a = np.asarray(im.crop((left, top, left + w, top + h)), dtype=np.float32)
    return torch.from_numpy(a).permute(2, 0, 1) / 127.5 - 1


@torch.no_grad()
def build_cache(folder, vae, text_encoder, size=1024, max_length=300, device="cpu", batch_size=8, square=False):
    """Encode every pair into shards of SHARD pairs; a shard whose sources and settings are unchanged is kept."""
    pairs = list_pairs(folder)
    out = os.path.join(folder, CACHE)
    os.makedirs(out, exist_ok=True)
    settings = {"vae": vae, "text_encoder": text_encoder, "size": size, "max_length": max_length, "square": square}
    enc = DCAEEncoder.from_pretrained(resolve(vae)).to(device).eval()
    factor = 2 ** (len(enc.config.widths) - 1)
    if size % factor:
        raise SystemExit(f"error: --size {size} must be a multiple of the autoencoder's factor {factor}")
    table = [(size, size)] if square else buckets(size, factor)
    text = load_text_encoder(text_encoder, max_length, device)  # Gemma-2 with SANA's instruction prefix
    shards = [os.path.join(out, f"shard_{s // SHARD:05d}.safetensors") for s in range(0, len(pairs), SHARD)]
    for old in set(glob.glob(os.path.join(out, "shard_*.safetensors"))) - set(shards):
        os.remove(old)  # images were removed: fewer shards now
    for s, path in zip(range(0, len(pairs), SHARD), shards):
        stamp = fingerprint(settings, pairs[s:s + SHARD])
        if os.path.exists(path) and shard_stamp(path) == stamp:
            continue
        tensors, by_bucket = {}, {}
        for i in range(s, min(s + SHARD, len(pairs))):
            im = open_image(pairs[i][0], pixels=False)  # the header: the size alone
            by_bucket.setdefault(nearest_bucket(im.height, im.width, table), []).append(i)
        for hw, items in by_bucket.items():  # one encoder batch = one bucket: one shape
            for b in range(0, len(items), batch_size):
                chunk = items[b:b + batch_size]
                x = torch.stack([load_image(pairs[i][0], hw) for i in chunk]).to(device)  # (b, 3, h, w)
                z = enc(x) * enc.scaling_factor  # (b, 32, h/32, w/32)
                y, mask = text([pairs[i][1] for i in chunk])  # (b, L, D), (b, L)
                for i, zi, yi, mi in zip(chunk, z, y, mask):
                    n = int(mi.sum())  # right padding: the real tokens come first
                    tensors[f"{i}.latent"] = zi.float().cpu()
                    tensors[f"{i}.text"] = yi[:n].to(torch.bfloat16).cpu()  # bf16 halves the cache
        atomic_save_file(tensors, path, {"sources": stamp})
    null_y, null_mask = text.null()
    meta = {"n": len(pairs), **settings, "text_dim": text.dim, "sources": fingerprint(settings, pairs)}
    atomic_save_file({"null.text": null_y[0, :int(null_mask.sum())].to(torch.bfloat16).cpu()},
                     os.path.join(out, "null.safetensors"), {"meta": json.dumps(meta)})
    return meta


def shard_stamp(path):
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        return (f.metadata() or {}).get("sources")


class FolderData:
    """Cached latents + text states. get_batch(step, B, rank, W): rows [rank*B/W, (rank+1)*B/W) of the global
    batch of `step`, all from the step's bucket (the same on every rank): rows step*B ... step*B + B-1 of that
    bucket's stream, a permutation per epoch (seeded). So resume and any world size agree, a batch never repeats
    an item the bucket has enough of, and over a run every item of a bucket is drawn equally often."""

    def __init__(self, folder, encoder="", max_length=300, seed=0):
        cache = os.path.join(folder, CACHE)
        null = os.path.join(cache, "null.safetensors")
        if not os.path.exists(null):
            raise SystemExit(f"error: {folder} is not encoded yet; run: python data.py --folder {folder} "
                             f"--vae <dc-ae> --text_encoder <gemma-2-2b-it>")
        from safetensors import safe_open
        with safe_open(null, "pt") as f:
            self.meta = json.loads(f.metadata()["meta"])
        settings = {k: self.meta.get(k) for k in ("vae", "text_encoder", "size", "max_length", "square")}
        if self.meta.get("sources") != fingerprint(settings, list_pairs(folder)):
            raise SystemExit(f"error: the cache in {cache} was encoded from other images or captions than {folder} "
                             f"holds now; encode again: python data.py --folder {folder} --vae {self.meta['vae']} "
                             f"--text_encoder {self.meta['text_encoder']} --size {self.meta['size']}"
                             + " --square" * bool(self.meta.get("square")))
        self.items = {}
        for path in sorted(glob.glob(os.path.join(cache, "shard_*.safetensors"))):
            self.items.update(load_file(path))
        self.n, self.max_length, self.seed = self.meta["n"], max_length, seed
        self.null_text = load_file(null)["null.text"]
        members = {}  # latent shape (C, h, w) -> the items of that bucket, in index order
        for i in range(self.n):
            members.setdefault(tuple(self.items[f"{i}.latent"].shape), []).append(i)
        self.shapes = sorted(members)
        self.members = [members[s] for s in self.shapes]
        self.sizes = torch.tensor([len(m) for m in self.members], dtype=torch.float)

    def _pad(self, texts):
        L = self.max_length
        y = torch.zeros(len(texts), L, self.meta["text_dim"])
        mask = torch.zeros(len(texts), L, dtype=torch.long)
        for i, t in enumerate(texts):
            y[i, :len(t)], mask[i, :len(t)] = t.float(), 1
        return y, mask  # (B, L, D), (B, L)

    def null(self):
        return self._pad([self.null_text])

    def bucket(self, step):
        """The bucket of `step`, drawn in proportion to the buckets' sizes: a pure function of (seed, step)."""
        if len(self.members) == 1:
            return 0
        return int(torch.multinomial(self.sizes, 1, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + step)))

    def get_batch(self, step, batch_size, rank=0, world_size=1):
        b = self.bucket(step)
        members, first, idx = self.members[b], step * batch_size, []
        for g in range(first + rank * batch_size // world_size, first + (rank + 1) * batch_size // world_size):
            epoch, pos = divmod(g, len(members))
            perm = torch.randperm(len(members), generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch
                                                                                       + 7_919 * b))
            idx.append(members[int(perm[pos])])
        y, mask = self._pad([self.items[f"{i}.text"] for i in idx])
        x = torch.stack([self.items[f"{i}.latent"] for i in idx])
        return {"x": x, "y": y, "mask": mask, "prompts": [str(i) for i in idx]}


if __name__ == "__main__":
    ap = ArgumentParser(description="Encode a folder of name.jpg + name.txt pairs for train.py --data")
    ap.add_argument("--folder", required=True, help="the images and their .txt captions; the cache goes inside")
    ap.add_argument("--vae", required=True, help="a DC-AE folder (diffusers AutoencoderDC) or our .safetensors")
    ap.add_argument("--text_encoder", required=True, help="a transformers folder (Gemma-2-2B-IT at real scale)")
    ap.add_argument("--size", type=int, default=1024, help="the buckets' base size: SANA's 40 at 1024 (e.g. 768x1344)")
    ap.add_argument("--square", action="store_true", help="no buckets: every image resized to cover size x size, cropped")
    ap.add_argument("--max_length", type=int, default=300, help="caption tokens (SANA: 300)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, ...")
    a = ap.parse_args()
    check_flags(vars(a), [(n, lambda v: v >= 1, "must be an integer >= 1") for n in ("size", "max_length")])
    print(build_cache(a.folder, a.vae, a.text_encoder, a.size, a.max_length, a.device, square=a.square))
