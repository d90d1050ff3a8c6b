"""tiny.py: the embedded default backbone (a tiny Qwen2.5-Omni thinker) and its processor."""
import filecmp

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    AutoProcessor,
    AutoTokenizer,
    Qwen2_5OmniProcessor,
    Qwen2_5OmniThinkerForConditionalGeneration,
    Qwen2VLImageProcessor,
    WhisperFeatureExtractor,
)

from lco_mini import backbone
from lco_mini.tiny import model as tiny

CORPUS = ["a red circle above a blue square", "the dog barks twice", "the word 42 is written in black ink"] * 20


def test_build_is_deterministic(tmp_path):
    small = dict(hidden_size=32, num_hidden_layers=1, intermediate_size=64, vision_hidden_size=16,
                 vision_heads=2, audio_d_model=16, audio_heads=2)
    dirs = [tiny.build_tiny(tmp_path / name, seed=seed, corpus=CORPUS, vocab_size=400, **small)
            for name, seed in [("a", 0), ("b", 0), ("c", 1)]]
    for name in ["model.safetensors", "tokenizer.json", "config.json", "processor_config.json"]:
        assert filecmp.cmp(dirs[0] / name, dirs[1] / name, shallow=False), name
    assert not filecmp.cmp(dirs[0] / "model.safetensors", dirs[2] / "model.safetensors", shallow=False)
    assert filecmp.cmp(dirs[0] / "tokenizer.json", dirs[2] / "tokenizer.json", shallow=False)  # seed: weights only


def test_default_size_is_a_few_million_parameters():
    tokenizer = tiny.build_tokenizer(CORPUS, vocab_size=1024)
    config = tiny.tiny_config(1024 + len(tiny.SPECIAL_TOKENS), **tiny.token_ids(tokenizer))
    with torch.device("meta"):  # shapes only: no memory, no init time
        model = Qwen2_5OmniThinkerForConditionalGeneration(config)
    counts = tiny.count_parameters(model)
    assert config.text_config.hidden_size == 256 and config.vision_config.out_hidden_size == 256
    assert config.audio_config.output_dim == 256
    assert config.text_config.rope_parameters["mrope_section"] == [8, 12, 12]  # sums to head_dim / 2 = 32
    assert 3e6 < counts["total"] < 10e6, counts
    assert counts["total"] == counts["vision"] + counts["audio"] + counts["language"] + counts["lm_head"]


def test_unknown_size_override_is_rejected_and_tiny_vocab_too():
    tokenizer = tiny.build_tokenizer(CORPUS[:3], vocab_size=260)  # too few merges for "user"
    with pytest.raises(ValueError, match="'user' is not one token"):
        tiny.token_ids(tokenizer)
    with pytest.raises(TypeError, match="hidden_sise"):
        tiny.tiny_config(300, hidden_sise=64)


def test_processor_round_trip(omni_dir, tmp_path):
    processor = AutoProcessor.from_pretrained(omni_dir)
    assert isinstance(processor, Qwen2_5OmniProcessor)
    assert isinstance(processor.image_processor, Qwen2VLImageProcessor)
    assert isinstance(processor.feature_extractor, WhisperFeatureExtractor)
    assert processor.feature_extractor.feature_size == 128 and processor.feature_extractor.sampling_rate == 16000
    assert (processor.image_processor.patch_size, processor.image_processor.merge_size) == (8, 2)
    assert processor.chat_template == tiny.chat_template()
    assert processor.tokenizer.padding_side == "left"
    processor.save_pretrained(tmp_path)
    again = AutoProcessor.from_pretrained(tmp_path)
    assert again.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    assert again.image_processor.to_dict() == processor.image_processor.to_dict()
    assert again.video_processor.to_dict() == processor.video_processor.to_dict()
    assert again.feature_extractor.to_dict() == processor.feature_extractor.to_dict()


def test_tokenizer_save_load_round_trip(tmp_path):
    """The saved tokenizer splits text exactly as the in-memory one: both use Qwen2's
    pre-tokenizer (Qwen2TokenizerFast re-installs it on load), and byte-level BPE is lossless."""
    built = tiny.build_tokenizer(CORPUS, vocab_size=400)
    built.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    tricky = "Héllo,  world 12345!\n\nnew-line's  ok\t<|IMAGE|><|IMAGE|> ☺ 3.14"
    assert loaded(tricky)["input_ids"] == built(tricky)["input_ids"]
    assert loaded.decode(built(tricky)["input_ids"]) == tricky
    assert (loaded.padding_side, loaded.image_token, loaded.audio_bos_token) == ("left", "<|IMAGE|>", "<|audio_bos|>")


def test_token_counts_worked_example(omni_dir):
    """64 x 64 image -> 8 x 8 patches -> 2 x 2 merge -> 16 tokens; a 128 x 32 document -> 16;
    1 s of audio -> 100 mel frames -> 25 tokens; 4 frames of 64 x 64 -> 2 x 16 tokens."""
    _, processor = backbone.load(omni_dir, device="cpu")
    image = Image.new("RGB", (64, 64), "red")
    items = [{"image": image}, {"image": Image.new("RGB", (128, 32), "white")},
             {"audio": np.zeros(16000, np.float32)}, {"video": [image] * 4}]
    tok = processor.tokenizer
    for item, token, count in zip(items, ["<|IMAGE|>", "<|IMAGE|>", "<|AUDIO|>", "<|VIDEO|>"], [16, 16, 25, 32]):
        ids = backbone.build_inputs(processor, [item])["input_ids"][0]
        assert (ids == tok.convert_tokens_to_ids(token)).sum() == count, item.keys()


def test_special_tokens_match_config(omni_dir):
    model, processor = backbone.load(omni_dir, device="cpu")
    config, tok = model.config, processor.tokenizer
    pairs = {"<|IMAGE|>": config.image_token_id, "<|VIDEO|>": config.video_token_id,
             "<|AUDIO|>": config.audio_token_id, "<|vision_bos|>": config.vision_start_token_id,
             "<|vision_eos|>": config.vision_end_token_id, "<|audio_bos|>": config.audio_start_token_id,
             "<|audio_eos|>": config.audio_end_token_id, "user": config.user_token_id,
             "<|im_end|>": config.text_config.eos_token_id, "<|endoftext|>": config.text_config.pad_token_id}
    for token, index in pairs.items():
        assert tok.convert_tokens_to_ids(token) == index, token
        assert tok(token, add_special_tokens=False)["input_ids"] == [index], token  # never split
    for token, index in [(processor.image_token, config.image_token_id), (processor.video_token, config.video_token_id),
                         (processor.audio_token, config.audio_token_id)]:
        assert tok.convert_tokens_to_ids(token) == index  # the processor's placeholders are the config's
    assert tok.pad_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>"
    assert len(tok) == config.text_config.vocab_size
    # special tokens come after the learned BPE vocabulary, as in the real Qwen vocabulary
    assert min(pairs[t] for t in tiny.SPECIAL_TOKENS if t in pairs) >= len(tok) - len(tiny.SPECIAL_TOKENS)


def test_greedy_generation_follows_the_logits(omni_dir):
    """generate() (greedy, with its KV cache) picks the argmax of a full forward pass at every step."""
    model, processor = backbone.load(omni_dir, device="cpu")
    inputs = backbone.build_inputs(processor, [{"text": "a dog"}])
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        ids = inputs["input_ids"]
        for _ in range(out.shape[1] - ids.shape[1]):
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -1]
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    assert out.shape[1] > inputs["input_ids"].shape[1] and torch.equal(out, ids)