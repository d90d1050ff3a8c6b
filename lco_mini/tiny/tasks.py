"""What the tiny default model trains on: batches drawn from the synthetic world (world.py).

  world_caption_examples  generative pretraining: describe an image/video/audio, read a
                          document, rephrase a caption; mixed by modality (PRETRAIN_MIX,
                          --pretrain-mix)
  world_pair_examples     contrastive learning: text pairs (caption -> paraphrase + a hard
                          negative), optionally with multimodal calibration pairs

Each takes a seed and is a pure function of it, so train.py can replay any step's batch.
A real backbone trains on the user's jsonl instead (lco_mini/support/data.py).
"""
from __future__ import annotations

import argparse
import random

from lco_mini.tiny import world

# The share of each task in a pretraining batch (of 32: 7 images, 4 videos, 6 sounds, 7 documents, 8
# texts). The tiny model reads held-out numbers only after ~3,500 documents in all, so documents take
# a quarter of a batch; the texts keep enough rephrasing for contrastive learning to start from.
# "alien": documents in the invented script, out of the default mix: they are what continual
# pretraining teaches (analyze.py continual).
PRETRAIN_MIX = {"image": 0.23, "video": 0.14, "audio": 0.18, "document": 0.23, "text": 0.22, "alien": 0.0}
WORLD_MEDIA = ("image", "video", "audio", "document")  # the order matters: rng.choice draws by index
MEDIA_KEY = {"image": "image", "document": "image", "video": "video", "audio": "audio",
             "alien": "image"}  # the model input each is


# The generic instructions of the tiny model's pretraining ("describe" task) and of the captioning
# probe (evaluation.captioning): none of them is the embedding prompt, so the base model has never
# been asked to "summarize in one word", as a real MLLM's instruction tuning.
DESCRIBE = {"image": "Describe the above image.", "video": "Describe the above video.",
            "audio": "Describe the above audio.", "document": "What does the above image say?",
            "alien": "What does the above image say?", "text": "Rephrase the above text."}


def parse_mix(text: str) -> dict[str, float]:
    """'audio=0.35,text=0.1' -> PRETRAIN_MIX with those shares replaced, rescaled to sum to 1."""
    mix = dict(PRETRAIN_MIX)
    for part in text.split(","):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in mix:
            raise argparse.ArgumentTypeError(f"unknown modality {name!r} in {text!r}; expected any of {', '.join(mix)}")
        try:
            mix[name] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r} is not MODALITY=SHARE (SHARE a number)") from None
        if not 0 <= mix[name] < float("inf"):
            raise argparse.ArgumentTypeError(f"the share of {name} must be a finite number >= 0; got {value}")
    total = sum(mix.values())
    if total <= 0:
        raise argparse.ArgumentTypeError("the pretraining mix is all zeros")
    return {name: share / total for name, share in mix.items()}


def world_caption_examples(n: int, seed: int, mix: dict[str, float] = PRETRAIN_MIX) -> list[tuple[dict, str]]:
    """(input item, target text) pairs for the tiny model's generative pretraining: captioning,
    OCR and paraphrasing with generic instructions (DESCRIBE), the target a random paraphrase of
    the item's caption. mix: the share of each modality ("text" = rephrasing a caption given as
    text input, "alien" = reading documents in the invented script).

    Image, audio and video learn to produce the *language* of their captions: the cross-modal
    alignment that contrastive learning later exploits comes from here.
    """
    rng = random.Random(seed)
    counts = {m: int(round(share * n)) for m, share in mix.items()}
    counts["text"] += n - sum(counts.values())
    examples = []
    for modality, count in counts.items():
        if count <= 0:
            continue
        source = rng.choice(WORLD_MEDIA) if modality == "text" else "document" if modality == "alien" else modality
        script = "alien" if modality == "alien" else "latin"
        for item in world.items(source, "train", count, seed=rng.randrange(2**31), script=script):
            inputs = {"text": rng.choice(item.captions)} if modality == "text" else {MEDIA_KEY[modality]: item.media}
            examples.append(({**inputs, "instruction": DESCRIBE[modality]}, rng.choice(item.captions)))
    rng.shuffle(examples)
    return examples


def world_pair_examples(n: int, seed: int, multimodal_ratio: float,
                        media: tuple[str, ...] = WORLD_MEDIA) -> list[tuple[dict, dict, dict]]:
    """(anchor, positive, hard negative) for contrastive learning: text only by default.

    With multimodal_ratio > 0 a share of the pairs become "calibration" pairs
    (media anchor -> caption), as in the paper's released checkpoints, drawn from the
    world modalities in `media` (a VL backbone takes no audio).
    """
    rng = random.Random(seed)
    n_media = int(round(multimodal_ratio * n))
    triples = [({"text": a}, {"text": p}, {"text": h}) for a, p, h in world.text_pairs("train", n - n_media, seed)]
    for _ in range(n_media):
        modality = rng.choice(media)
        item = world.items(modality, "train", 1, seed=rng.randrange(2**31))[0]
        triples.append(({MEDIA_KEY[modality]: item.media}, {"text": item.captions[0]}, {"text": item.negative}))
    rng.shuffle(triples)
    return triples
