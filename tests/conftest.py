"""Shared test set-up: the repo root on sys.path, one thread, no network, and a tiny Gemma-2 text encoder
(`build_tiny_gemma`, the `tiny_gemma` fixture) that stands in for gemma-2-2b-it on the real-scale paths, and a
tiny random LLaVA (the `tiny_llava` fixture) that stands in for a VLM judge."""
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


def trained_like(cfg, seed=0):
    """A LinearDiT whose every tensor is random and non-trivial (not the init's zeros and ones), as a trained
    model's: a test comparing two models then checks every tensor."""
    from model import LinearDiT
    torch.manual_seed(seed)
    model = LinearDiT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def tiny_gemma(tmp_path_factory):
    """A folder holding build_tiny_gemma's model, built once per test module."""
    return build_tiny_gemma(tmp_path_factory.mktemp("tiny_gemma") / "gemma")


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    """A 2-layer random LLaVA whose first answer token is "yes" or "no", by the image: (folder, vocab)."""
    import savila

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast)

    words = sorted(set(savila.QUESTION.replace("{prompt}", "").lower().replace("'", " ' ").replace(".", " . ")
                       .replace(":", " : ").replace(",", " , ").split()) | {"photo", "of", "red", "circle", "user"})
    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", "<image>"] + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                        unk_token="<unk>", extra_special_tokens={"image_token": "<image>"})
    template = ("{% for m in messages %}{{ m['role'] }}: {% for c in m['content'] %}{% if c['type'] == 'image' %}"
                "<image>{{ '\\n' }}{% else %}{{ c['text'] }}{% endif %}{% endfor %}{{ '\\n' }}{% endfor %}"
                "{% if add_generation_prompt %}assistant: {% endif %}")
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=32, patch_size=8),
        text_config=LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                                pad_token_id=0, eos_token_id=1, bos_token_id=2),
        image_token_index=vocab["<image>"], vision_feature_select_strategy="default", vision_feature_layer=-1)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():  # only "yes" and "no" can win the first answer token, and which one depends on the image
        head = model.lm_head.weight
        r = torch.randn(head.shape[1])
        head.zero_()
        head[vocab["yes"]], head[vocab["no"]] = 10 * r, -10 * r
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=template)
    folder = tmp_path_factory.mktemp("llava")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder, vocab
