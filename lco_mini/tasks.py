"""What the tiny default model trains on: batches drawn from the synthetic world (world.py).

  world_caption_examples  generative pretraining: describe an image/video/audio, read a
                          document, rephrase a caption, or (--pretrain-qa) answer a question
                          about one attribute; mixed by modality (PRETRAIN_MIX, --pretrain-mix)
  world_pair_examples     contrastive learning: text pairs (caption -> paraphrase + a hard
                          negative), optionally with multimodal calibration pairs

Each takes a seed and is a pure function of it, so train.py can replay any step's batch.
A real backbone trains on the user's jsonl instead (lco_mini/data.py).
"""
from __future__ import annotations

import argparse
import random

from lco_mini import world

# The share of each task in a pretraining batch (of 32: 7 images, 4 videos, 6 sounds, 7 documents, 8
# texts). Documents need ~3,500 in all before the tiny model reads (1 in 7 did not teach it; 3 in 10,
# taken from the texts, made CL on the base barely train: docs/experiments.md). "alien": documents in
# the invented script, kept out of the default mix for continual pretraining (analyze.py continual).
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

# Short questions about one attribute, as in the visual/audio question answering of a real MLLM's
# instruction data. The answer is the attribute's phrase, so the first answer token has to come from
# the medium itself, not from caption grammar ("a", "the sound of"...).
QUESTIONS = {
    "image": {"colour": "What colour is the shape?", "shape": "What shape is it?",
              "size": "How big is the shape?", "position": "Where is the shape?"},
    "image2": {"colour": "What colour is the shape on the left?", "shape": "What shape is on the left?",
               "colour2": "What colour is the shape on the right?", "shape2": "What shape is on the right?"},
    "video": {"colour": "What colour is the shape?", "shape": "What shape is it?", "motion": "What does the shape do?"},
    "audio": {"pitch": "How high is the sound?", "timbre": "What kind of sound is it?",
              "contour": "Does the sound rise or fall?", "rhythm": "What is the rhythm of the sound?"},
}


def questions(modality, attributes, k=0):
    """(question, answer) about each attribute of a combination; answers use synonym set k % 2.

    Documents have none: reading the number ("What does the above image say?") is their question."""
    a = attributes
    kind = "image2" if modality == "image" and a.get("kind") == "two" else modality
    asked = dict(QUESTIONS.get(kind, {}))
    if modality == "video" and a["motion"] == "recolour":
        asked.pop("colour")  # two colours: the motion phrase names both
    words = {name: world.PHRASES[value][k % 2] for name, value in a.items() if value in world.PHRASES}
    return [(question, words[name].format(**words)) for name, question in asked.items()]


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


def summary(item) -> str:
    """The answer to "Summarize the above ... in one word:" for a world item.

    The canonical caption with its content first: "red circle on the left", not "a red
    circle ...", and for a document just its number. What matters is the first answer
    token: the last prompt position (the one that becomes the embedding) is trained to
    predict it, so it must be about the content. With a leading "a" for every item that
    position learned one constant and contrastive learning could barely move it.
    """
    if item.modality == "document":
        return item.attributes["number"]
    words = item.captions[0].split(" ", 1)
    return words[1] if words[0] in ("a", "an", "the") and len(words) == 2 else item.captions[0]


def world_caption_examples(n: int, seed: int, task: str = "describe", mix: dict[str, float] = PRETRAIN_MIX,
                           qa: float = 0.0) -> list[tuple[dict, str]]:
    """(input item, target text) pairs for the tiny model's generative pretraining.

    task="describe": captioning / OCR / paraphrasing with generic instructions (DESCRIBE),
    the target a random paraphrase of the item's caption. task="summary": every modality
    is trained to answer the embedding prompt itself with the item's summary (an ablation).
    mix: the share of each modality ("text" = rephrasing a caption given as text input,
    "alien" = reading documents in the invented script).
    qa: the share of image/video/audio examples that ask about one attribute instead
    ("What is the rhythm of the sound?" -> "beeping twice"), as VQA data does for a real MLLM.
    Either way image, audio and video learn to produce the *language* of their captions:
    the cross-modal alignment that contrastive learning later exploits comes from here.
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
            asked = questions(item.modality, item.attributes, rng.randrange(2)) if qa and modality != "text" else []
            if task == "summary":
                examples.append((inputs, summary(item)))
            elif asked and rng.random() < qa:
                question, answer = rng.choice(asked)
                examples.append(({**inputs, "instruction": question}, answer))
            else:
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
