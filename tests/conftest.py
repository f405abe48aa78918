"""Shared test set-up: the repo root on sys.path, one thread, no network, and a tiny Gemma-2 text encoder
(`build_tiny_gemma`, the `tiny_gemma` fixture) that stands in for gemma-2-2b-it on the real-scale paths."""
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(1)  # tiny tensors: 1 thread is ~100x faster than 2 on loaded 2-core machines


def build_tiny_gemma(folder, seed=0):
    """A 2-layer, 32-wide Gemma-2 with fixed seeded random weights and a word-level tokenizer over the shapes
    world's words, saved as a transformers folder (written to a temp folder, then renamed). Returns the folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import Gemma2Config, Gemma2Model, PreTrainedTokenizerFast

    import shapes

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    words = sorted({w for p in shapes.all_prompts() for w in p.text.split()})
    vocab = {w: i for i, w in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                        pad_token="<pad>", unk_token="<unk>", padding_side="right")
    config = Gemma2Config(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=128,
                          sliding_window=64, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    with torch.random.fork_rng(devices=[]):  # seeded weights without touching the caller's RNG
        torch.manual_seed(seed)
        model = Gemma2Model(config).eval()
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=folder.name + ".tmp"))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder


@pytest.fixture(scope="module")
def tiny_gemma(tmp_path_factory):
    """A folder holding build_tiny_gemma's model, built once per test module."""
    return build_tiny_gemma(tmp_path_factory.mktemp("tiny_gemma") / "gemma")
