"""Shared fixtures: tiny *random* backbones of the three supported families, built locally
(no hub) and saved to folders, so tests go through backbone.load(folder) like real use.
Every test runs in fp32, train.py subprocesses included (lco_mini/support/precision.py)."""
import os
import subprocess
import sys
from pathlib import Path

os.environ["LCO_MINI_PRECISION"] = "fp32"  # before lco_mini.support.precision reads it
for _offline in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):  # nothing is downloaded: models and data are built here
    os.environ.setdefault(_offline, "1")

import pytest
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLProcessor,
)

from lco_mini.tiny import model as tiny

CORPUS = ["a red circle above a blue square", "the dog barks twice", "a green triangle moves left",
          "the word 42 is written in black ink", "two small yellow stars, one big star!"] * 20
SMALL = tiny.SIZES["smoke"]  # smaller than the default, so the tests stay fast on two CPU cores
VOCAB = 400  # enough BPE merges to make "user" a single token


@pytest.fixture(scope="session")
def omni_dir(tmp_path_factory):
    """Tiny Qwen2.5-Omni thinker + Qwen2_5OmniProcessor, via tiny.build_tiny."""
    return tiny.build_tiny(tmp_path_factory.mktemp("omni"), seed=0, corpus=CORPUS, vocab_size=VOCAB, **SMALL)


# The VL family (Qwen2-VL, Qwen2.5-VL) names its vision tokens differently and has no audio.
VL_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                     "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
VL_NAMED_TOKENS = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                   "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>"}


def _build_vl(out_dir, config_class, model_class, processor_class, vision: dict):
    import torch

    tokenizer = tiny.build_tokenizer(CORPUS, vocab_size=VOCAB, special_tokens=VL_SPECIAL_TOKENS,
                                     named_tokens=VL_NAMED_TOKENS)
    tid = tokenizer.convert_tokens_to_ids
    text = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
                bos_token_id=None, eos_token_id=tid("<|im_end|>"), pad_token_id=tid("<|endoftext|>"))
    config = config_class(text_config=text, vision_config=vision,
                          image_token_id=tid("<|image_pad|>"), video_token_id=tid("<|video_pad|>"),
                          vision_start_token_id=tid("<|vision_start|>"), vision_end_token_id=tid("<|vision_end|>"))
    torch.manual_seed(0)
    model_class(config).save_pretrained(out_dir)
    processor_class(image_processor=tiny.image_processor(), tokenizer=tokenizer,
                    video_processor=tiny.video_processor(), chat_template=tiny.chat_template(VL_NAMED_TOKENS)
                    ).save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def qwen2_vl_dir(tmp_path_factory):
    vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, patch_size=8, spatial_merge_size=2,
                  temporal_patch_size=2, mlp_ratio=4)
    return _build_vl(tmp_path_factory.mktemp("qwen2_vl"), Qwen2VLConfig, Qwen2VLForConditionalGeneration,
                     Qwen2VLProcessor, vision)


@pytest.fixture(scope="session")
def qwen2_5_vl_dir(tmp_path_factory):
    vision = dict(depth=2, hidden_size=32, intermediate_size=128, num_heads=2, out_hidden_size=64, patch_size=8,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=64, fullatt_block_indexes=[1])
    return _build_vl(tmp_path_factory.mktemp("qwen2_5_vl"), Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                     Qwen2_5_VLProcessor, vision)


# ----------------------------------------------------------------------------- a smoke run of train.py
ROOT = Path(__file__).resolve().parents[1]
SMOKE_RUN = ["--tiny-size", "smoke", "--pretrain-batch", "8", "--batch-size", "8", "--eval-n", "12", "--no-control"]


def train(args, **kwargs):
    """python train.py ARGS in a subprocess (as a user runs it): stdout, stderr, returncode."""
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, **kwargs)


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """A smoke run of 8 pretraining steps: snapshots at 1, 2, 4, 6 (auto), base/ at 8, merged/ after 3
    CL steps (the GRSL ladder and the continual experiment's base)."""
    out = tmp_path_factory.mktemp("ladder")
    result = train([*SMOKE_RUN, "--out", str(out), "--pretrain-steps", "8", "--steps", "3"])
    assert result.returncode == 0, result.stderr[-3000:]
    return out
