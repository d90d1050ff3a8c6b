"""One path for every backbone: load an MLLM, prompt it, pool its last token.

LCO-Emb turns a multimodal LLM into an embedding model without a new head: the
item (text, image, audio, video, or image + text) goes into one user chat turn,
followed by an instruction to summarise it in one word, then the generation
prompt ("<|im_start|>assistant\\n"). The embedding is the last layer's hidden
state at the *last* token, L2-normalised.

Why the last token: a decoder attends causally, so only the last position has
seen the whole input; and it is the position that would predict the one-word
summary, so generative pretraining already made it a compressed description of
the item (the paper's point: a good generator is a good representer).

Why left padding: in a batch of prompts of different lengths, right padding puts
each row's last real token at a different column, and pad tokens *after* it.
Left padding puts the last real token of every row in the last column. Pad
tokens are masked out of attention, and the position ids of the real tokens
start at 0 (Qwen2.5-Omni: cumsum of the attention mask; Qwen2-VL family: 3D
M-RoPE ids from `get_rope_index`, which skips masked tokens). One exception:
Qwen2-VL models give a *text-only* batch plain 0..T-1 positions, pads included,
so a left-padded row starts at #pads; RoPE attention depends only on position
differences, so that shift changes nothing beyond float rounding. Net effect: an
item gets the same embedding alone or in any batch, in any order (tested at
1e-5 in fp32 with the default SDPA attention, so no attn_implementation is
forced). `pooling.pool(mode="last")` finds the last attended token for either
padding side; left padding is what generation uses, and every processor here
is forced to it.

The split for training: `build_inputs(processor, items)` makes a padded batch
(CPU, no model); `embed_batch(model, inputs)` runs the model with gradients.
lco_mini/embedder.py wraps both for inference: `Embedder`, the Python API.
"""
from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoProcessor,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5OmniThinkerForConditionalGeneration,
    Qwen2VLForConditionalGeneration,
)

from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

from lco_mini import pooling
from lco_mini.support import media, precision, sources

# The paper's prompts, appended after the item inside the user turn.
PROMPTS = {
    "text": "{text}\nSummarize the above text in one word:",
    "image": "\nSummarize the above image in one word:",
    "audio": "\nSummarize the above audio in one word:",
    "video": "\nSummarize the above video in one word:",
    "interleaved": "{text}\nSummarize the above in one word:",  # media + text (or several media)
}
MEDIA = ("image", "video", "audio")  # the order media take inside a turn
END_OF_TURN = "<|im_end|>"  # the chat templates of every supported family close a turn with it

# model_type in config.json -> class. A full Qwen2.5-Omni checkpoint ("qwen2_5_omni", thinker +
# talker + token2wav) loads only its thinker: embeddings need no speech output.
ARCHITECTURES = {
    "qwen2_5_omni": Qwen2_5OmniThinkerForConditionalGeneration,
    "qwen2_5_omni_thinker": Qwen2_5OmniThinkerForConditionalGeneration,
    "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
    "qwen2_vl": Qwen2VLForConditionalGeneration,
}


# ----------------------------------------------------------------------------- loading

def load_config(name_or_path):
    """(source, config) for a folder or hub id; a hub that cannot be reached is one line (OSError),
    a model that is not multimodal (a text-only LLM) is a ValueError."""
    source = sources.model_source(name_or_path)
    try:
        config = AutoConfig.from_pretrained(source)
    except OSError as e:  # transformers' "couldn't connect to the hub" / "not a valid model identifier"
        raise OSError(f"{name_or_path}: cannot load the model ({' '.join(str(e).split())})") from None
    if config.model_type not in ARCHITECTURES and config.model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        raise ValueError(f"{name_or_path}: a {config.model_type!r} model is not a multimodal (image-text-to-text) "
                         f"model; lco_mini needs an MLLM such as Qwen2.5-Omni, Qwen2.5-VL or Qwen2-VL")
    return source, config


def _default_device_dtype(device, dtype, stored_dtype=None, precision_used=None):
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if dtype is None:  # bf16 on CUDA; on a CPU, a bf16 checkpoint stays bf16 where bf16 is native
        if precision_used is None and device.type == "cpu":  # the command's --precision, else the default
            requested = precision.DEFAULT if precision.DEFAULT in precision.CHOICES else "fp32"
            precision_used = precision.choose(requested, device)[0]
        dtype = precision.load_dtype(device, precision_used, stored_dtype)
    return device, dtype


def saved_video_size(processor) -> dict | None:
    """The frame size the checkpoint saved, where it must be passed to the processor; else None.

    Qwen2.5-Omni's processor pins video frames to 128..768 tokens of 28 x 28 pixels (the real
    model's patch 14 x merge 2), overriding the size its video processor saved. For a checkpoint
    on another grid (the tiny model: patch 8 x merge 2) that unit is wrong and would blow 64 x 64
    frames up to 320 x 320 (800 tokens for 4 frames), so the saved size is passed instead."""
    video = getattr(processor, "video_processor", None)
    if video is None or video.patch_size * video.merge_size == 28:
        return None
    return {"shortest_edge": video.size["shortest_edge"], "longest_edge": video.size["longest_edge"]}


def _audio_kwargs(processor, clips: list) -> dict:
    """Qwen2.5-Omni's processor pads every clip to its feature extractor's whole window before the
    mel transform: 300 s for the real model, 0.6 s of CPU and 15 MB of features for a 2 s clip.
    Padding to the batch's longest clip plus one FFT window gives every real frame the samples it
    would see in the whole window, so the same features (tested bit for bit), and the audio tower
    reads only the real frames (feature_attention_mask)."""
    features = processor.feature_extractor
    if not all(hasattr(features, name) for name in ("n_samples", "hop_length", "n_fft")):
        return {}
    hop, longest = features.hop_length, max(len(clip) for clip in clips)
    return {"audio_kwargs": {"max_length": min(features.n_samples, -(-(longest + features.n_fft) // hop) * hop)}}


def load_processor(source):
    """The processor of a folder or hub id, its tokenizer padding on the left (see the module docstring)."""
    processor = AutoProcessor.from_pretrained(source)
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:  # padding needs some token; it is masked out anyway
        tokenizer.pad_token = tokenizer.eos_token
    return processor


def record_attention(folder, implementation: str) -> None:
    """Write the attention implementation ("eager", "sdpa", ...) into a saved model's config.json:
    from_pretrained loads the model with it, and save_pretrained does not write it."""
    config_file = Path(folder) / "config.json"
    config = json.loads(config_file.read_text())
    config["attn_implementation"] = implementation
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def load(name_or_path, device=None, dtype=None, precision_used=None):
    """(model, processor) for a Qwen2.5-Omni, Qwen2.5-VL, Qwen2-VL or other image-text-to-text
    checkpoint, from a local folder or a hub id. dtype by default: bf16 on CUDA; on a CPU, bf16 for
    a checkpoint stored in bf16 when precision_used (train.py's --precision; default: auto, env
    LCO_MINI_PRECISION) is bf16, else fp32 (precision.load_dtype). The processor's tokenizer pads
    on the left (see the module docstring)."""
    source, config = load_config(name_or_path)
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    device, dtype = _default_device_dtype(device, dtype, stored, precision_used)
    model_class = ARCHITECTURES.get(config.model_type, AutoModelForImageTextToText)
    if config.model_type == "qwen2_5_omni":
        # transformers strips the "thinker." prefix of the full checkpoint's weight names when
        # the thinker class loads it (its checkpoint conversion mapping); talker weights are skipped.
        config = config.thinker_config
    model = model_class.from_pretrained(source, config=config, dtype=dtype)
    model.to(device).eval()

    return model, load_processor(source)


# ----------------------------------------------------------------------------- prompts -> batch

# The part of a processor that turns each medium into model inputs.
MEDIA_PROCESSORS = {"image": "image_processor", "video": "video_processor", "audio": "feature_extractor"}


def input_kinds(processor) -> tuple[str, ...]:
    """What a backbone takes: "text" always, and each medium its processor has a part for
    (Qwen2.5-Omni: image, video, audio; Qwen2-VL and Qwen2.5-VL: image, video)."""
    return ("text",) + tuple(kind for kind in MEDIA if getattr(processor, MEDIA_PROCESSORS[kind], None) is not None)


def chat_content(item: dict) -> list[dict]:
    """The user turn for one item: its media placeholders, then the text + instruction.

    The instruction is the paper's embedding prompt, unless the item carries its own
    "instruction" (generative training uses other tasks, e.g. "Describe the above image.")."""
    unknown = set(item) - {"text", "instruction", *MEDIA}
    if unknown:
        raise ValueError(f"unknown item keys {sorted(unknown)}; expected any of text, image, audio, video")
    kinds = [k for k in MEDIA if item.get(k) is not None]
    text = item.get("text")
    if not kinds and not isinstance(text, str):
        raise ValueError(f"item has nothing to embed: {item!r}")
    if item.get("instruction"):
        prompt = f"{text or ''}\n{item['instruction']}"
    elif not kinds:
        prompt = PROMPTS["text"].format(text=text)
    elif not text and len(kinds) == 1:
        prompt = PROMPTS[kinds[0]]
    else:
        prompt = PROMPTS["interleaved"].format(text=text or "")
    return [{"type": k} for k in kinds] + [{"type": "text", "text": prompt}]


def truncate_text(tokenizer, text: str, max_tokens: int | None) -> tuple[str, bool]:
    """(text cut after its first max_tokens tokens, whether it was cut). Only the item's own text
    is cut: cutting the whole prompt would drop the instruction and the last token we pool."""
    if max_tokens is None:
        return text, False
    # The first max_tokens tokens lie within max_tokens * (the longest token) characters: cut the
    # string there first, so a 20 MB text costs what its first few thousand characters cost.
    text = text[:(max_tokens + 1) * _longest_token(tokenizer)]
    fast = getattr(tokenizer, "is_fast", False)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=fast, verbose=False)
    ids = encoding["input_ids"]
    if len(ids) <= max_tokens:
        return text, False
    if fast:  # cut the original string at a token boundary (decode could alter whitespace)
        return text[:encoding["offset_mapping"][max_tokens - 1][1]], True
    return tokenizer.decode(ids[:max_tokens]), True


def _longest_token(tokenizer) -> int:
    """The most characters one token can stand for (cached on the tokenizer: the vocabulary is
    read once). Byte-level BPE tokens are shown in their byte alphabet: one character a byte."""
    longest = getattr(tokenizer, "_lco_longest_token", None)
    if longest is None:
        longest = max(len(token) for token in tokenizer.get_vocab()) + 1
        tokenizer._lco_longest_token = longest
    return longest


def image_budget(processor) -> int | None:
    """The most pixels the image processor keeps, for Qwen-VL-family processors (their
    size["longest_edge"] is a pixel count, not an edge as in other families); else None."""
    images = getattr(processor, "image_processor", None)
    if images is None or not hasattr(images, "merge_size"):
        return None
    return getattr(images, "max_pixels", None) or getattr(images.size, "longest_edge", None)


def bound_items(processor, items: list[dict], max_text_tokens: int | None) -> tuple[list[dict], int]:
    """Copies of items with texts cut to max_text_tokens, and image files decoded within the
    processor's pixel budget (JPEGs decoded small: an 81 MP file never reaches the processor).
    Returns them and the number of texts cut."""
    budget, bounded, cut = image_budget(processor), [], 0
    for item in items:
        item = dict(item)
        if isinstance(item.get("text"), str):
            item["text"], was_cut = truncate_text(processor.tokenizer, item["text"], max_text_tokens)
            cut += was_cut
        image = item.get("image")
        if image is not None and budget and not (hasattr(image, "size") and image.size[0] * image.size[1] <= budget):
            item["image"] = media.load_image(image, max_pixels=budget)
        bounded.append(item)
    return bounded, cut


def audio_window(processor) -> float | None:
    """Seconds of audio the processor keeps (it cuts the rest): 30 s for Qwen2.5-Omni, 5 s tiny."""
    features = getattr(processor, "feature_extractor", None)
    if features is None or not getattr(features, "n_samples", None):
        return None
    return features.n_samples / features.sampling_rate


def build_inputs(processor, items: list[dict], targets: list[str] | None = None,
                 max_text_tokens: int | None = media.MAX_TEXT_TOKENS):
    """A left-padded BatchFeature (tensors on CPU) for `items`.

    Each item is a dict with any of "text" (str), "image" (PIL image or path), "audio" (1-D
    float array at 16 kHz or path), "video" (list of PIL frames or path); at most one of each.
    Paths are decoded by lco_mini.support.media. Every row ends with the generation prompt. Texts
    and targets are cut to max_text_tokens tokens each (None: not cut), images to the
    processor's pixel budget (see bound_items).

    targets (generative training): row i continues with the assistant's answer targets[i]
    and the end-of-turn token, and the batch gets `labels` = input_ids on the answer,
    -100 elsewhere. Left padding makes this easy: the answer is the last tokens of each row."""
    if not items:
        raise ValueError("build_inputs: no items")
    items = bound_items(processor, items, max_text_tokens)[0]
    if targets is not None:
        targets = [truncate_text(processor.tokenizer, t, max_text_tokens)[0] if isinstance(t, str) else t
                   for t in targets]
    texts, media_lists = [], {"image": [], "video": [], "audio": []}
    for item in items:
        messages = [{"role": "user", "content": chat_content(item)}]
        texts.append(processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
        for kind in MEDIA:
            if item.get(kind) is not None:
                media_lists[kind].append(_decode(processor, kind, item[kind]))
    for kind in MEDIA:
        if media_lists[kind] and kind not in input_kinds(processor):
            raise ValueError(f"{type(processor).__name__} takes no {kind}: use an Omni model for {kind} items")
    processor.tokenizer.padding_side = "left"
    if targets is not None:
        answers = [target + END_OF_TURN for target in _check_targets(targets, items)]
        texts = [text + answer for text, answer in zip(texts, answers)]
    kwargs = {"images": media_lists["image"], "videos": media_lists["video"], "audio": media_lists["audio"]}
    kwargs = {name: value for name, value in kwargs.items() if value}  # processors reject empty lists
    if media_lists["video"]:
        size = saved_video_size(processor)
        if size is not None:
            kwargs["videos_kwargs"] = {"size": size}
    if media_lists["audio"]:
        kwargs.update(_audio_kwargs(processor, media_lists["audio"]))
    batch = processor(text=texts, padding=True, return_tensors="pt", **kwargs)
    if targets is not None:
        batch["labels"] = _answer_labels(processor.tokenizer, batch["input_ids"], answers)
    return batch


def _decode(processor, kind: str, value):
    """A path or an object -> what the processor takes. Of an audio file only the model's window
    (and a second more, so that resampling ends as it would on the whole file) is read."""
    if kind == "audio":
        window = audio_window(processor)
        return media.load_audio(value, max_seconds=window + 1 if window else None)
    return media.LOADERS[kind](value)


def _check_targets(targets, items) -> list[str]:
    if len(targets) != len(items) or not all(isinstance(t, str) and t.strip() for t in targets):
        raise ValueError("targets must be one non-empty string per item")
    return targets


def _answer_labels(tokenizer, input_ids: torch.Tensor, answers: list[str]) -> torch.Tensor:
    """labels: the answer's token ids at the end of each row, -100 (not scored) elsewhere."""
    labels = torch.full_like(input_ids, -100)
    for row, answer in enumerate(answers):
        ids = torch.tensor(tokenizer(answer, add_special_tokens=False)["input_ids"])
        if not torch.equal(input_ids[row, -len(ids):], ids):  # the answer must tokenize on its own
            raise ValueError(f"answer {answer!r} tokenizes differently after the prompt")
        labels[row, -len(ids):] = ids
    return labels


# ----------------------------------------------------------------------------- batch -> embeddings

def embed_batch(model, inputs, layers: str = "last", normalize: bool = True) -> torch.Tensor:
    """L2-normalised last-token embeddings of a batch from build_inputs. Keeps gradients.

    layers="last": [N, D] from the last layer (after the final norm).
    layers="all":  [L + 1, N, D], index 0 = the token embeddings (input of layer 1),
                   index i = output of decoder layer i; index L is after the final norm,
                   i.e. equal to layers="last".
    normalize=False: the last token's hidden state itself, in fp32.
    Runs the decoder without lm_head (`model.model`), so no [N, T, vocab] logits are computed,
    except for an architecture whose `model.model` takes no media (see below)."""
    if layers not in ("last", "all"):
        raise ValueError(f"layers must be 'last' or 'all', got {layers!r}")
    device = next(model.parameters()).device
    inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}
    mask = inputs["attention_mask"]

    def pool(hidden):  # pool in the model's dtype, normalise in fp32 (a bf16 norm is off by ~1e-3)
        last = pooling.pool(hidden, mask, mode="last", normalize=False).float()
        return F.normalize(last, dim=-1) if normalize else last

    decoder = multimodal_decoder(model)
    if decoder is None:  # no lm_head-free module that takes pixels: run the whole model
        out = model(**inputs, use_cache=False, output_hidden_states=True, return_dict=True)
        hidden = out.hidden_states
        return pool(hidden[-1]) if layers == "last" else torch.stack([pool(h) for h in hidden])
    out = decoder(**inputs, use_cache=False, output_hidden_states=layers == "all", return_dict=True)
    if layers == "last":
        return pool(out.last_hidden_state)
    return torch.stack([pool(h) for h in out.hidden_states])


def multimodal_decoder(model):
    """`model.model` when it is the full multimodal stack without lm_head (Qwen2VLModel,
    Qwen2_5OmniThinkerModel, LlavaModel, ...), else None: an image-text-to-text model whose
    `.model` is the text-only decoder takes no pixels or audio there."""
    decoder = getattr(model, "model", None)
    if decoder is None:
        return None
    accepted = inspect.signature(decoder.forward).parameters
    return decoder if "pixel_values" in accepted or "input_features" in accepted else None
