"""The synthetic omnimodal world the tiny model learns from.

A real MLLM learns cross-modal alignment from billions of captioned images, sounds
and videos; lco_mini's tiny model learns it from this small, compositional world:

  image     one or two coloured shapes on a dark background, 64 x 64 RGB
  video     4 frames (64 x 64) of one shape moving, growing, shrinking or changing colour
  audio     1.0 s, 16 kHz mono sound events: pitch x timbre x rhythm x contour
  document  a rendered three-digit number, 64 x 16 RGB, black on white, in Latin digits or
            in an invented "alien" script (one procedurally drawn glyph per digit), reserved
            for the continual-pretraining experiment (analyze.py continual)

Each item is a *combination* of attribute values (colour=red, shape=circle, size=small,
position=left) with paraphrased captions (templates x synonyms: what text-only contrastive
learning must learn to ignore) and a hard negative (the same template with ONE attribute
changed: what it must learn to notice). A fixed held-out split holds back COMBINATIONS
(colour x shape pairs, pitch x rhythm pairs, numbers whose digits sum to a multiple of 5); every value still occurs
in training, so held-out retrieval measures compositional generalisation. Training
negatives stay in the training split: no held-out caption reaches training text
(only corpus(), which fits the tokenizer, lists every string).

Deterministic: the same (modality, split, n, seed) gives bit-identical items.
Look at it:  python -m lco_mini.tiny.world --dump out/world --n 8
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from lco_mini.tiny.render import (COLOUR_RGB, CONTOURS, PITCH_HZ, POSITION_XY, RHYTHMS, SAMPLE_RATE, SIZE_PX,
                             render_audio, render_document, render_image, render_video)

# ----------------------------------------------------------------------------- the world at a glance
# The attribute values. Colours, sizes, positions, pitches, contours and rhythms are the keys of
# render.py's tables (COLOUR_RGB, SIZE_PX, ...), which say how each value looks or sounds.
SHAPES = ("circle", "square", "triangle", "cross")
MOTIONS = ("rightward", "leftward", "up", "down", "grow", "shrink", "recolour")
TIMBRES = ("whistle", "buzz", "hiss")                     # sine, band-limited square, narrow-band noise

# Every attribute value -> (canonical phrase, synonym). Values are unique across modalities.
PHRASES = {
    "red": ("red", "crimson"), "green": ("green", "emerald"), "blue": ("blue", "azure"),
    "yellow": ("yellow", "golden"), "purple": ("purple", "violet"), "orange": ("orange", "amber"),
    "circle": ("circle", "disc"), "square": ("square", "box"), "triangle": ("triangle", "wedge"),
    "cross": ("cross", "plus sign"), "small": ("small", "tiny"), "large": ("large", "big"),
    "left": ("on the left", "at the left side"), "right": ("on the right", "at the right side"),
    "top": ("at the top", "near the top edge"), "bottom": ("at the bottom", "near the bottom edge"),
    "center": ("in the center", "in the middle"),
    "rightward": ("moving from left to right", "sliding to the right"),
    "leftward": ("moving from right to left", "sliding to the left"),
    "up": ("moving up", "going upward"), "down": ("moving down", "going downward"),
    "grow": ("growing larger", "getting bigger"), "shrink": ("shrinking", "getting smaller"),
    "recolour": ("changing from {colour} to {colour2}", "turning from {colour} to {colour2}"),
    "low": ("low", "deep"), "mid": ("medium", "moderate"), "high": ("high", "shrill"),
    "whistle": ("whistle", "pure tone"), "buzz": ("buzz", "drone"), "hiss": ("hiss", "rustle"),
    "rising": ("rising", "ascending"), "falling": ("falling", "descending"), "flat": ("flat", "level"),
    "steady": ("steady", "unbroken"), "pulsing": ("pulsing", "throbbing"),
    "twice": ("beeping twice", "in two beeps"), "thrice": ("beeping three times", "in three beeps"),
}
# Paraphrase k uses TEMPLATES[...][k] with synonym k % 2; k = 0 (canonical words) is captions[0].
TEMPLATES = {
    "image": ["a {size} {colour} {shape} {position}", "{position} there is a {size} {colour} {shape}",
              "an image of a {size} {colour} {shape} {position}", "a {colour} {shape}, {size}, {position}"],
    "image2": ["a {colour} {shape} {left} and a {colour2} {shape2} {right}",
               "a {colour2} {shape2} {right} and a {colour} {shape} {left}",
               "an image of a {colour} {shape} to the left of a {colour2} {shape2}",
               "two shapes: a {colour} {shape} {left}, a {colour2} {shape2} {right}"],
    "video": ["a {thing} {motion}", "a clip of a {thing} {motion}",
              "in this video a {thing} is {motion}", "a short video: a {thing} {motion}"],
    "audio": ["a {pitch} {timbre}, {contour}, {rhythm}", "the sound of a {pitch} {timbre}, {contour} and {rhythm}",
              "{rhythm}: a {contour} {pitch} {timbre}", "audio of a {contour} {pitch} {timbre}, {rhythm}"],
    "document": ["the number {number}", "a document that reads {number}", "text saying {number}",
                 "a printed label: {number}"],
}
N_PARAPHRASES = 4
# Documents show numbers, not words: Qwen2's pre-tokenizer splits every number into single digits,
# so a held-out number is a new combination of trained tokens. A held-out *word* would be one BPE
# token that no training text ever contains, and no model could read it out.
NUMBERS = tuple(str(n) for n in range(100, 1000))
HELDOUT_COLOUR_SHAPE = {("red", "triangle"), ("green", "cross"), ("blue", "circle"), ("yellow", "square")}
# Audio holds out pitch x rhythm: what is heard x when, which a sound carries independently (as an
# image carries colour and shape). Pitch x timbre cannot be held out: a low buzz's odd harmonics
# reach as high as a high tone's, so an unseen buzz is heard at the wrong pitch (docs/experiments.md).
HELDOUT_PITCH_RHYTHM = {("low", "pulsing"), ("mid", "twice"), ("high", "steady")}
# ~20% of numbers (180 of 900); every digit still occurs at every position in training.
HELDOUT_NUMBERS = {n for n in NUMBERS if sum(map(int, n)) % 5 == 0}

MODALITIES = ("text", "image", "video", "audio", "document")
CAPTIONED = ("image", "video", "audio", "document")       # modalities with their own caption space
SPLITS = ("train", "heldout")
SCRIPTS = ("latin", "alien")


@dataclass
class Item:
    modality: str                 # "text" | "image" | "video" | "audio" | "document"
    media: object                 # PIL.Image | list[PIL.Image] | float32 np.ndarray (16 kHz) | None
    captions: list[str]           # >= 3 paraphrases; captions[0] is the canonical one
    negative: str                 # hard negative: captions[0]'s template with one attribute changed
    attributes: dict              # the combination (what the held-out split is defined on)
    script: str = ""              # "latin" | "alien" for documents
    negative_attributes: dict = field(default_factory=dict)
    geometry: dict = field(default_factory=dict)   # where shapes were drawn (centres, radii): for tests/plots


# ----------------------------------------------------------------------------- combinations and splits
def _key(attributes):
    return tuple(sorted(attributes.items()))


def _all_combinations(modality):
    objects = list(itertools.product(COLOUR_RGB, SHAPES))
    if modality == "image":
        one = [dict(kind="one", colour=c, shape=s, size=z, position=p)
               for (c, s), z, p in itertools.product(objects, SIZE_PX, POSITION_XY)]
        two = [dict(kind="two", colour=c, shape=s, colour2=c2, shape2=s2)
               for (c, s), (c2, s2) in itertools.product(objects, objects) if (c, s) != (c2, s2)]
        return one + two
    if modality == "video":
        moves = [dict(colour=c, shape=s, motion=m) for (c, s), m in itertools.product(objects, MOTIONS[:-1])]
        recolours = [dict(colour=c, shape=s, motion="recolour", colour2=c2)
                     for (c, s), c2 in itertools.product(objects, COLOUR_RGB) if c2 != c]
        return moves + recolours
    if modality == "audio":
        return [dict(pitch=p, timbre=t, rhythm=r, contour=c)
                for p, t, r, c in itertools.product(PITCH_HZ, TIMBRES, RHYTHMS, CONTOURS)]
    if modality == "document":
        return [dict(number=n) for n in NUMBERS]
    raise ValueError(f"unknown modality {modality!r}; expected one of {MODALITIES}")


def is_heldout(modality, attributes):
    """True if the combination belongs to the held-out split."""
    a = attributes
    if modality in ("image", "video"):   # a video's colour2 is the same shape in another colour
        pairs = [(a["colour"], a["shape"])] + ([(a["colour2"], a.get("shape2", a["shape"]))] if "colour2" in a else [])
        return any(pair in HELDOUT_COLOUR_SHAPE for pair in pairs)
    if modality == "audio":
        return (a["pitch"], a["rhythm"]) in HELDOUT_PITCH_RHYTHM
    return a["number"] in HELDOUT_NUMBERS


@lru_cache(maxsize=None)
def _split_keys(modality, split):
    _check(modality, split)
    return tuple(_key(a) for a in _all_combinations(modality) if is_heldout(modality, a) == (split == "heldout"))


def combinations(modality, split):
    """The attribute dicts of a split, in a fixed order ("text": all captioned modalities' combinations)."""
    if modality == "text":
        return [dict(k) for m in CAPTIONED for k in _split_keys(m, split)]
    return [dict(k) for k in _split_keys(modality, split)]


def n_combinations(modality, split):
    """How many distinct combinations (hence distinct canonical captions) a split holds."""
    return len(combinations(modality, split))


def _check(modality, split="train", script="latin"):
    for name, value, allowed in (("modality", modality, MODALITIES), ("split", split, SPLITS),
                                 ("script", script, SCRIPTS)):
        if value not in allowed:
            raise ValueError(f"unknown {name} {value!r}; expected one of {allowed}")
    if script != "latin" and modality != "document":
        raise ValueError(f"script={script!r} applies to documents only, not {modality!r}")


# ----------------------------------------------------------------------------- captions and hard negatives
def caption(modality, attributes, k=0):
    """Paraphrase k (0 = canonical) of a combination."""
    syn = k % 2
    words = {name: PHRASES[value][syn] if value in PHRASES else value for name, value in attributes.items()}
    if modality == "image" and attributes["kind"] == "two":
        text = TEMPLATES["image2"][k].format(left=PHRASES["left"][syn], right=PHRASES["right"][syn], **words)
    elif modality == "video":
        motion = words["motion"].format(**words)
        thing = words["shape"] if attributes["motion"] == "recolour" else f"{words['colour']} {words['shape']}"
        text = TEMPLATES["video"][k].format(thing=thing, motion=motion)
    else:
        text = TEMPLATES[modality][k].format(**words)
    return re.sub(r"\ba (?=[aeiou])", "an ", text)   # "a orange square" -> "an orange square"


@lru_cache(maxsize=None)
def _negative_keys(modality, key, split):
    """Combinations that differ from `key` in exactly one attribute (documents: in exactly one digit).

    Training negatives stay inside the training split so held-out captions never reach training;
    held-out items may take negatives from anywhere."""
    allowed = set(_split_keys(modality, "train") + (_split_keys(modality, split) if split == "heldout" else ()))
    attributes = dict(key)
    if modality == "document":
        number = attributes["number"]
        others = [number[:i] + d + number[i + 1:] for i in range(len(number)) for d in "0123456789"]
        return tuple(_key({"number": n}) for n in others if n != number and _key({"number": n}) in allowed)
    candidates = [_key({**attributes, name: other}) for name, value in key if name != "kind"
                  for other in _values(modality, name) if other != value]
    return tuple(c for c in candidates if c in allowed)   # e.g. not two identical shapes


@lru_cache(maxsize=None)
def _values(modality, name):
    return sorted({a[name] for a in _all_combinations(modality) if name in a})


def render_item(modality, attributes, seed=0, script="latin"):
    """Render one combination -> (media, geometry). `seed` only moves/jitters things, never the meaning."""
    _check(modality, "train", script)
    rng = np.random.default_rng(seed) if isinstance(seed, (int, np.integer)) else seed
    if modality == "document":
        return render_document(attributes, rng, script)
    renderer = {"image": render_image, "video": render_video, "audio": render_audio}.get(modality)
    return renderer(attributes, rng) if renderer else (None, {})


# ----------------------------------------------------------------------------- public sampling API
def _draw_order(count, n, rng):
    """Concatenated random permutations: the first `count` draws are all distinct, then it cycles."""
    return np.concatenate([np.zeros(0, int)] + [rng.permutation(count) for _ in range(-(-n // count))])[:n]


def items(modality, split="train", n=8, seed=0, script="latin"):
    """n deterministic items; the first n_combinations(modality, split) have distinct combinations."""
    _check(modality, split, script)
    pool = [(m, k) for m in (CAPTIONED if modality == "text" else (modality,)) for k in _split_keys(m, split)]
    rng = np.random.default_rng([seed, MODALITIES.index(modality), SPLITS.index(split), SCRIPTS.index(script)])
    out = []
    for index in _draw_order(len(pool), n, rng):
        source, key = pool[index]
        negatives = _negative_keys(source, key, split)
        negative = dict(negatives[rng.integers(len(negatives))])
        media, geometry = render_item(modality, dict(key), rng, script)
        out.append(Item(modality, media, [caption(source, dict(key), k) for k in range(N_PARAPHRASES)],
                        caption(source, negative, 0), dict(key), script if modality == "document" else "",
                        negative, geometry))
    return out


def text_pairs(split="train", n=1000, seed=0):
    """(anchor, paraphrase positive, hard negative) over all modalities' caption spaces, as pure text.

    The negative uses the positive's template and synonyms, so only the changed attribute tells them apart."""
    _check("text", split)
    rng = np.random.default_rng([seed, 7, SPLITS.index(split)])
    pairs = []
    for _ in range(n):
        modality = CAPTIONED[rng.integers(len(CAPTIONED))]
        keys = _split_keys(modality, split)
        key = keys[rng.integers(len(keys))]
        negatives = _negative_keys(modality, key, split)
        i, j = rng.choice(N_PARAPHRASES, size=2, replace=False)
        pairs.append((caption(modality, dict(key), i), caption(modality, dict(key), j),
                      caption(modality, dict(negatives[rng.integers(len(negatives))]), j)))
    return pairs


def corpus():
    """Every caption the world can produce (all paraphrases of all combinations): for the tokenizer.

    Instructions and questions are left out: the byte-level BPE spells them from pieces of these."""
    texts = [caption(m, a, k) for m in CAPTIONED for a in _all_combinations(m) for k in range(N_PARAPHRASES)]
    return list(dict.fromkeys(texts))


def save_item(item, dir, stem, relative_to=None):
    """Write item's media to dir/stem.{png,gif,wav}; return its official jsonl record.

    Paths in the record are relative to `relative_to` (default: `dir`), i.e. to the folder holding the jsonl."""
    import soundfile
    os.makedirs(dir, exist_ok=True)
    ext = {"image": "png", "document": "png", "video": "gif", "audio": "wav"}.get(item.modality)
    anchor = {"image_path": "", "text": item.captions[1]}
    if ext:
        path = os.path.join(dir, f"{stem}.{ext}")
        if item.modality == "video":   # 4 frames at 4 fps, looping
            item.media[0].save(path, save_all=True, append_images=item.media[1:], duration=250, loop=0)
        elif item.modality == "audio":
            soundfile.write(path, item.media, SAMPLE_RATE, subtype="FLOAT")   # float32: reloads bit-identically
        else:
            item.media.save(path)
        kind = {"png": "image_path", "gif": "video_path", "wav": "audio_path"}[ext]
        anchor = {kind: os.path.relpath(path, relative_to or dir), "text": ""}
    return {"anchor": anchor, "positive": {"image_path": "", "text": item.captions[0]},
            "negative": {"image_path": "", "text": item.negative}}


def _overview(rows, path):
    """Contact sheet: one row per modality, captions[0] above each sample."""
    import textwrap
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = max(len(r) for _, r in rows)
    fig, axes = plt.subplots(len(rows), n, figsize=(2.4 * n, 2.1 * len(rows)), squeeze=False)
    for axrow, (name, row) in zip(axes, rows):
        for ax, item in itertools.zip_longest(axrow, row):
            ax.set_xticks([]), ax.set_yticks([])
            if item is None:
                ax.axis("off")
                continue
            if item.modality == "audio":
                ax.specgram(item.media, NFFT=400, Fs=SAMPLE_RATE, noverlap=240, cmap="magma")
                ax.set_ylim(0, 4000)
            elif item.modality == "video":
                ax.imshow(np.concatenate([np.array(f) for f in item.media], axis=1))
            else:
                ax.imshow(item.media)
            ax.set_title(textwrap.fill(item.captions[0], 26), fontsize=6)
        axrow[0].set_ylabel(name, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Dump samples of the synthetic world (png/gif/wav + captions.jsonl).")
    parser.add_argument("--dump", required=True, help="output folder")
    parser.add_argument("--n", type=int, default=8, help="items per modality")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", default="train", choices=SPLITS)
    args = parser.parse_args(argv)
    rows, records = [], []
    for name, modality, script in [("image", "image", "latin"), ("video", "video", "latin"), ("audio", "audio", "latin"),
                                   ("document", "document", "latin"), ("alien", "document", "alien")]:
        row = items(modality, args.split, args.n, args.seed, script=script)
        records += [save_item(item, args.dump, f"{name}_{i:03d}") for i, item in enumerate(row)]
        rows.append((name, row))
    jsonl = os.path.join(args.dump, "captions.jsonl")
    with open(jsonl, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    _overview(rows, os.path.join(args.dump, "overview.png"))
    print(f"wrote {len(records)} media files ({args.n} per row: {', '.join(n for n, _ in rows)}) to {args.dump}/")
    print(f"wrote {jsonl} (paths relative to its folder)")
    print(f"wrote {os.path.join(args.dump, 'overview.png')}")


if __name__ == "__main__":
    main()
