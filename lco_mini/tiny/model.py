"""The embedded default backbone: a tiny Qwen2.5-Omni thinker, built locally.

Nothing can be downloaded where lco_mini is built and tested, and a laptop has no
GPU, so the default model is made here, from the *real* transformers classes:

* **Model:** `Qwen2_5OmniThinkerConfig` + `Qwen2_5OmniThinkerForConditionalGeneration`
  (a vision tower, an audio tower and a language model), shrunk to a few million
  parameters and randomly initialised. Later stages pretrain it generatively on
  the synthetic world (captioning) and then contrastively (LCO-Emb).
* **Tokenizer:** a byte-level BPE trained with the `tokenizers` library on the
  world's text, with the same normaliser (NFC) and pre-tokenizer regex as Qwen2,
  plus the Qwen2.5-Omni special tokens appended after the BPE vocabulary (as in
  the real vocabulary), wrapped as a `Qwen2TokenizerFast` with left padding.
* **Processor:** a real `Qwen2_5OmniProcessor` = Qwen2-VL image and video
  processors (patch 8, merge 2, temporal patch 2) + a Whisper feature extractor
  (128 mel bins, 16 kHz) + the tokenizer + the Qwen2.5-Omni chat template.

The vision grid is chosen for the world's 64 x 64 images: 8 x 8 pixel patches give
8 x 8 = 64 patches, and the 2 x 2 spatial merge hands 16 tokens to the language
model (a 64 x 16 "document" image gives 4, one per 16-px cell: three digits and a blank). Audio clips are ~1 s: 100 mel
frames, one audio-tower window (`n_window` = 50 frames after the stride-2 conv),
25 tokens for the language model.

`build_tiny(out_dir)` saves model + processor with `save_pretrained`, so every
later step loads the tiny model exactly like a hub model: `backbone.load(out_dir)`.
Run `python -m lco_mini.tiny OUT_DIR` to build one and print its size.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    Qwen2_5OmniProcessor,
    Qwen2_5OmniThinkerConfig,
    Qwen2_5OmniThinkerForConditionalGeneration,
    Qwen2TokenizerFast,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
    WhisperFeatureExtractor,
)

SYSTEM_PROMPT = "You are a helpful assistant."  # the default of the real Qwen2.5-Omni template

# Special tokens, in the order of the real Qwen2.5-Omni vocabulary (ids 151643...).
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>",
                  "<|audio_eos|>", "<|vision_bos|>", "<|vision_eos|>", "<|vision_pad|>",
                  "<|IMAGE|>", "<|VIDEO|>"]
# Named special tokens: the processors read tokenizer.image_token, .audio_bos_token, ...
NAMED_TOKENS = {"image_token": "<|IMAGE|>", "audio_token": "<|AUDIO|>", "video_token": "<|VIDEO|>",
                "vision_bos_token": "<|vision_bos|>", "vision_eos_token": "<|vision_eos|>",
                "audio_bos_token": "<|audio_bos|>", "audio_eos_token": "<|audio_eos|>"}
# Qwen2's pre-tokenizer regex. Qwen2TokenizerFast re-installs it when loading, so we
# must train with it too, or the saved tokenizer would split text differently.
QWEN2_PRETOKENIZE_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
                           r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")


def chat_template(named_tokens: dict = NAMED_TOKENS) -> str:
    """The Qwen2.5-Omni chat template, verbatim except for the system prompt, which is
    `SYSTEM_PROMPT` in the real template anyway. With another family's named tokens and no
    audio token (tests/conftest.py: Qwen2-VL's), that family's template."""
    bos, eos = named_tokens["vision_bos_token"], named_tokens["vision_eos_token"]
    image, video = named_tokens["image_token"], named_tokens["video_token"]
    audio = ("{% elif content['type'] == 'audio' or 'audio' in content or 'audio_url' in content %}"
             "{% set audio_count.value = audio_count.value + 1 %}"
             "{% if add_audio_id %}Audio {{ audio_count.value }}: {% endif %}"
             f"{named_tokens['audio_bos_token']}{named_tokens['audio_token']}{named_tokens['audio_eos_token']}"
             ) if "audio_token" in named_tokens else ""
    return (
        "{% set audio_count = namespace(value=0) %}{% set image_count = namespace(value=0) %}"
        "{% set video_count = namespace(value=0) %}"
        "{% for message in messages %}"
        "{% if loop.first and message['role'] != 'system' %}"
        "<|im_start|>system\n" + SYSTEM_PROMPT + "<|im_end|>\n{% endif %}"
        "<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
        "{% else %}{% for content in message['content'] %}"
        "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
        "{% set image_count.value = image_count.value + 1 %}"
        "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
        f"{bos}{image}{eos}"
        + audio +
        "{% elif content['type'] == 'video' or 'video' in content %}"
        "{% set video_count.value = video_count.value + 1 %}"
        "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
        f"{bos}{video}{eos}"
        "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


def _template_text() -> list[str]:
    """Words every prompt contains (roles, system prompt, the LCO-Emb instructions). Training
    the BPE on them too makes each a short token sequence, and "user" a single token
    (the thinker config stores its id as user_token_id)."""
    from lco_mini.backbone import PROMPTS  # lazy: backbone is the heavier module
    prompts = [p.replace("{text}", "") for p in PROMPTS.values()]
    return ["system\n" + SYSTEM_PROMPT, "user\n", "assistant\n", *prompts] * 50


def build_tokenizer(corpus: list[str], vocab_size: int = 1024, special_tokens: list[str] = SPECIAL_TOKENS,
                    named_tokens: dict = NAMED_TOKENS) -> Qwen2TokenizerFast:
    """Train a byte-level BPE (Qwen2's normaliser and pre-tokenizer) on `corpus`; append the
    special tokens after the learned vocabulary. Deterministic for a given corpus."""
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(list(corpus) + _template_text(), trainer)
    bpe.add_special_tokens(special_tokens)  # ids after the BPE vocab, like Qwen's
    return Qwen2TokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token=None, padding_side="left",  # left: the last position is every row's last token
        extra_special_tokens=named_tokens,
    )


# Default sizes of the tiny thinker. Hidden size D of the embeddings = hidden_size.
TINY_SIZE = dict(
    hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=1024,                                # language model
    vision_hidden_size=128, vision_depth=2, vision_heads=4,  # vision tower
    audio_d_model=128, audio_layers=2, audio_heads=4,        # audio tower
)

# Size presets for train.py --tiny-size: "smoke" is for tests that train end to end in seconds.
SIZES = {
    "default": TINY_SIZE,
    "smoke": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, vision_hidden_size=32, vision_depth=2, vision_heads=2,
                  audio_d_model=32, audio_layers=2, audio_heads=2),
}


def _mrope_section(head_dim: int) -> list[int]:
    """Split the rotary frequencies among (time, height, width) like the real model:
    [16, 24, 24] of 64 for head_dim 128, i.e. 1/4, 3/8, 3/8."""
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


TOKEN_ID_KEYS = ("image_token_index", "video_token_index", "audio_token_index", "vision_start_token_id",
                 "vision_end_token_id", "audio_start_token_id", "audio_end_token_id", "user_token_id",
                 "pad_token_id", "eos_token_id")


def tiny_config(vocab_size: int, **overrides) -> Qwen2_5OmniThinkerConfig:
    """A Qwen2.5-Omni thinker config of a few million parameters.

    overrides: sizes (keys of TINY_SIZE) and token ids (TOKEN_ID_KEYS, see `token_ids`)."""
    unknown = set(overrides) - set(TINY_SIZE) - set(TOKEN_ID_KEYS)
    if unknown:
        raise TypeError(f"tiny_config: unknown overrides {sorted(unknown)}; sizes are {sorted(TINY_SIZE)}")
    size = {**TINY_SIZE, **{k: v for k, v in overrides.items() if k in TINY_SIZE}}
    ids = {k: v for k, v in overrides.items() if k in TOKEN_ID_KEYS}
    hidden, heads = size["hidden_size"], size["num_attention_heads"]
    text = dict(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=size["intermediate_size"],
        num_hidden_layers=size["num_hidden_layers"], num_attention_heads=heads,
        num_key_value_heads=size["num_key_value_heads"], max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                         "mrope_section": _mrope_section(hidden // heads)},
        tie_word_embeddings=False,
        pad_token_id=ids.get("pad_token_id"), eos_token_id=ids.get("eos_token_id"),
    )
    patch, merge = 8, 2
    vision = dict(
        depth=size["vision_depth"], hidden_size=size["vision_hidden_size"],
        intermediate_size=4 * size["vision_hidden_size"], num_heads=size["vision_heads"],
        patch_size=patch, spatial_merge_size=merge, temporal_patch_size=2,
        out_hidden_size=hidden,
        # Windowed attention over 4 x 4 merged patches (64 px, the whole tiny image),
        # full attention in the last block: the real model's 112 px / patch 14 ratio.
        window_size=4 * merge * patch, fullatt_block_indexes=[size["vision_depth"] - 1],
    )
    audio = dict(
        num_mel_bins=128, d_model=size["audio_d_model"], encoder_layers=size["audio_layers"],
        encoder_attention_heads=size["audio_heads"], encoder_ffn_dim=4 * size["audio_d_model"],
        output_dim=hidden,
        n_window=50,  # attention windows of 2 * 50 mel frames = 1 s (the real model: 2 s)
    )
    thinker_ids = {k: v for k, v in ids.items() if k not in ("pad_token_id", "eos_token_id")}
    return Qwen2_5OmniThinkerConfig(text_config=text, vision_config=vision, audio_config=audio,
                                    **thinker_ids)


def token_ids(tokenizer) -> dict[str, int]:
    """The thinker config's token ids, read off the tokenizer (the two must agree)."""
    def tid(token):
        index = tokenizer.convert_tokens_to_ids(token)
        if index is None or index == tokenizer.unk_token_id:
            raise ValueError(f"{token!r} is not one token of this tokenizer (vocab_size too small?)")
        return index

    return dict(
        image_token_index=tid("<|IMAGE|>"), video_token_index=tid("<|VIDEO|>"),
        audio_token_index=tid("<|AUDIO|>"),
        vision_start_token_id=tid("<|vision_bos|>"), vision_end_token_id=tid("<|vision_eos|>"),
        audio_start_token_id=tid("<|audio_bos|>"), audio_end_token_id=tid("<|audio_eos|>"),
        user_token_id=tid("user"), pad_token_id=tid("<|endoftext|>"), eos_token_id=tid("<|im_end|>"),
    )


GRID = dict(patch_size=8, merge_size=2, temporal_patch_size=2)  # 8 x 8 px patches, 2 x 2 merge


def image_processor() -> Qwen2VLImageProcessor:
    """Images: 1024 px at least (32 x 32 or 64 x 16: 4 tokens), 128 x 128 at most (64 tokens); a 64 x 64 scene
    and a 64 x 16 document image pass through unchanged (16 and 4 tokens)."""
    return Qwen2VLImageProcessor(min_pixels=32 * 32, max_pixels=128 * 128, **GRID)


def video_processor() -> Qwen2VLVideoProcessor:
    """Video frames: at most 64 x 64 px, 16 tokens per pair of frames (temporal patch 2).
    cap_pixels_per_frame=True is the reference (qwen-vl-utils) behaviour."""
    return Qwen2VLVideoProcessor(min_pixels=32 * 32, max_pixels=64 * 64, cap_pixels_per_frame=True, **GRID)


def feature_extractor() -> WhisperFeatureExtractor:
    """128 mel bins at 16 kHz like Qwen2.5-Omni, but chunk_length 5 s instead of Whisper's 30 s:
    every clip is padded to chunk_length before the mel transform, so a short window is much
    cheaper. Longer audio is truncated to 5 s (the real model truncates at 30 s)."""
    return WhisperFeatureExtractor(feature_size=128, sampling_rate=16000, chunk_length=5)


def build_processor(tokenizer) -> Qwen2_5OmniProcessor:
    """The real Qwen2.5-Omni processor around `tokenizer`, sized for the tiny model."""
    return Qwen2_5OmniProcessor(image_processor=image_processor(), video_processor=video_processor(),
                                feature_extractor=feature_extractor(), tokenizer=tokenizer,
                                chat_template=chat_template())


def count_parameters(model) -> dict[str, int]:
    """Parameters per part (vision tower, audio tower, language model + lm_head) and total."""
    if hasattr(model.model, "language_model"):  # recent transformers: model.{visual, audio_tower, language_model}
        towers = model.model
        language = model.model.language_model
    else:  # earlier releases: the towers sit on the thinker itself, .model is the text decoder
        towers, language = model, model.model
    parts = {"vision": towers.visual, "audio": towers.audio_tower, "language": language, "lm_head": model.lm_head}
    counts = {name: sum(p.numel() for p in part.parameters()) for name, part in parts.items()}
    counts["total"] = sum(p.numel() for p in model.parameters())
    return counts


def build_tiny(out_dir, seed: int = 0, corpus: list[str] | None = None, vocab_size: int = 1024,
               **size_overrides) -> Path:
    """Build the tiny thinker + processor, save both to `out_dir` and return its Path.

    corpus: texts for the BPE (default: `lco_mini.tiny.world.corpus()`); vocab_size: BPE merges
    target before the special tokens; size_overrides: keys of TINY_SIZE. Same arguments,
    same seed -> byte-identical files."""
    if corpus is None:
        from lco_mini.tiny import world  # lazy: the world is only needed for the default corpus
        corpus = world.corpus()
    tokenizer = build_tokenizer(corpus, vocab_size=vocab_size)
    processor = build_processor(tokenizer)
    config = tiny_config(len(tokenizer), **token_ids(tokenizer), **size_overrides)

    torch.manual_seed(seed)  # the only randomness: weight initialisation
    model = Qwen2_5OmniThinkerForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = [config.text_config.eos_token_id]
    model.generation_config.pad_token_id = config.text_config.pad_token_id

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    # Plain ("eager") attention: at these sizes (sequences of ~60 tokens, 64 vision patches an
    # image) torch's SDPA kernels cost more than the matmuls they replace on a CPU (a bf16
    # contrastive step: 19% slower with SDPA).
    from lco_mini.backbone import record_attention  # lazy, as in _template_text
    record_attention(out, "eager")
    counts = count_parameters(model)
    print(f"tiny Qwen2.5-Omni thinker: {counts['total'] / 1e6:.2f}M parameters "
          f"(vision {counts['vision'] / 1e6:.2f}M, audio {counts['audio'] / 1e6:.2f}M, "
          f"language {counts['language'] / 1e6:.2f}M, lm_head {counts['lm_head'] / 1e6:.2f}M), "
          f"vocab {len(tokenizer)}, hidden {config.text_config.hidden_size} -> {out}")
    return out


if __name__ == "__main__":
    build_tiny(sys.argv[1] if len(sys.argv) > 1 else "tiny-omni")
