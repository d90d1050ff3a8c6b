"""The any2any jsonl dataset: the official LCO-Embedding training format, validated up front.

One JSON object per line, each side an item that may hold text, an image, or both
(an empty string means "absent"):

    {"anchor":   {"image_path": "", "text": "a red circle on the left"},
     "positive": {"image_path": "", "text": "on the left there is a red circle"},
     "negative": {"image_path": "", "text": "a blue circle on the left"}}

lco_mini reads exactly this, plus "audio_path" and "video_path" on any side. The
"negative" side is optional (no hard negative: only in-batch negatives). Relative
paths are resolved against the folder that holds the jsonl file.

Why validate everything before training starts: a typo on line 90,000 should not
crash a run after an hour, and "KeyError: 'text'" says nothing about where the
problem is. Every problem is reported with its line number and the offending path;
`skip_bad=True` skips such lines instead and counts them.

Drawing batches from a dataset (jsonl_examples) is here too: epoch-wise permutations, each
batch a pure function of (seed, step), so a resumed run draws what an uninterrupted one would.
"""
from __future__ import annotations

import functools
import json
import random
from dataclasses import dataclass
from pathlib import Path

from lco_mini.support import media

SIDES = ("anchor", "positive", "negative")
REQUIRED_SIDES = ("anchor", "positive")
FIELDS = {"text": None, "image_path": "image", "audio_path": "audio", "video_path": "video"}


class DataError(ValueError):
    """A problem with one line of a dataset file, with the file and line in the message."""


@dataclass
class Pair:
    """One training example: item dicts as backbone.build_inputs expects them."""

    anchor: dict
    positive: dict
    negative: dict | None
    line: int


def parse_side(side: object, where: str, base_dir: Path) -> dict:
    """Turn one side of a record into an item dict {"text": str, "image": Path, ...}."""
    if not isinstance(side, dict):
        raise DataError(f"{where}: expected an object with text/image_path/audio_path/video_path")
    unknown = set(side) - set(FIELDS)
    if unknown:
        raise DataError(f"{where}: unknown field(s) {sorted(unknown)}; allowed: {sorted(FIELDS)}")
    item = {}
    for field, key in FIELDS.items():
        value = side.get(field, "")
        if not isinstance(value, str):
            raise DataError(f"{where}.{field}: expected a string, got {type(value).__name__}")
        if not value.strip():
            continue
        if key is None:
            item["text"] = value
        else:
            path = Path(value) if Path(value).is_absolute() else base_dir / value
            item[key] = path
    if not item:
        raise DataError(f"{where}: empty (no text and no file)")
    return item


def check_files(item: dict, where: str) -> None:
    """Decode every file an item names, so a broken file fails now and not mid-training."""
    for key, load in media.LOADERS.items():
        if key in item:
            try:
                load(item[key])
            except media.MediaError as err:
                raise DataError(f"{where}: {err}") from None


def parse_line(text: str, line: int, base_dir: Path, decode: bool) -> Pair:
    where = f"line {line}"
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
    except RecursionError:  # json's parser recurses once per nesting level
        raise DataError(f"{where}: nested too deeply to be a record (anchor/positive[/negative] objects)") from None
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object with anchor/positive[/negative]")
    for side in REQUIRED_SIDES:
        if side not in record:
            raise DataError(f"{where}: missing field '{side}'")
    items = {}
    for side in SIDES:
        if side in record:
            items[side] = parse_side(record[side], f"{where}: {side}", base_dir)
            if decode:
                check_files(items[side], f"{where}: {side}")
    return Pair(items["anchor"], items["positive"], items.get("negative"), line)


def read_jsonl(path: str | Path, skip_bad: bool = False, decode: bool = True,
               progress: bool = True) -> tuple[list[Pair], int]:
    """Read and validate a dataset file. Returns (pairs, number of skipped bad lines).

    decode=True opens every referenced file (the slow, safe default); a bad line
    raises DataError naming file and line unless skip_bad, which counts it instead.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such dataset file")
    lines = _read_lines(path)
    pairs, bad = [], 0
    from tqdm import tqdm

    for number, text in enumerate(tqdm(lines, desc=f"checking {path.name}", unit="line",
                                       disable=not progress or len(lines) < 200), start=1):
        if not text.strip():
            continue
        try:
            pairs.append(parse_line(text, number, path.parent, decode))
        except DataError as err:
            if not skip_bad:
                raise DataError(f"{path}: {err}") from None
            bad += 1
    if not pairs:
        raise DataError(f"{path}: no usable examples" + (f" ({bad} bad lines skipped)" if bad else ""))
    return pairs, bad


def _read_lines(path: Path) -> list[str]:
    """The file's lines, split on "\\n" only: str.splitlines() also splits on U+2028, U+0085 and
    other characters that are valid inside a JSON string, and would cut a good record in pieces.
    A UTF-8 byte-order mark (Windows editors write one) is dropped. A byte that is not UTF-8
    stops the read even with skip_bad: a file in another encoding is wrong as a whole, and
    skipping its lines would quietly drop data."""
    raw = path.read_bytes().removeprefix(b"\xef\xbb\xbf")
    lines = []
    for number, line in enumerate(raw.split(b"\n"), start=1):
        try:
            lines.append(line.decode("utf-8"))
        except UnicodeDecodeError as err:
            raise DataError(f"{path}: line {number}: not UTF-8 (byte 0x{line[err.start]:02x} at byte "
                            f"{err.start + 1} of the line); save the file as UTF-8") from None
    return lines


def check_processor_takes(pairs: list[Pair], processor, path) -> None:
    """Build one batch per kind of item (image, audio, image + text, ...) with the backbone's
    processor: a modality it cannot take (audio for a VL model) fails now, naming the line, and
    not an hour into training."""
    from lco_mini import backbone  # lazily: reading a dataset needs no torch

    first = {}
    for pair in pairs:
        for item in filter(None, (pair.anchor, pair.positive, pair.negative)):  # the negative is optional
            first.setdefault(tuple(sorted(item)), (pair.line, item))
    for line, item in first.values():
        try:
            backbone.build_inputs(processor, [item])
        except ValueError as err:
            raise DataError(f"{path}: line {line}: {' '.join(str(err).split())}") from None


def cut_texts(pairs: list[Pair], tokenizer, max_tokens: int) -> int:
    """Cut every text to max_tokens tokens (backbone.truncate_text), in place; returns how many were cut."""
    from lco_mini import backbone

    cut = 0
    for pair in pairs:
        for item in (pair.anchor, pair.positive, pair.negative):
            if item and "text" in item:
                item["text"], was_cut = backbone.truncate_text(tokenizer, item["text"], max_tokens)
                cut += was_cut
    return cut


def is_text_only(pair: Pair) -> bool:
    sides = [pair.anchor, pair.positive] + ([pair.negative] if pair.negative else [])
    return all(set(side) == {"text"} for side in sides)


# ----------------------------------------------------------------------------- drawing batches

def split_by_modality(pairs: list) -> tuple[list, list]:
    """(text-only pairs, pairs with an image, audio or video somewhere)."""
    return [p for p in pairs if is_text_only(p)], [p for p in pairs if not is_text_only(p)]


def jsonl_examples(pairs: list, n: int, step: int, seed: int) -> list:
    """The n pairs of a step: the step-th slice of a stream of epochs, each a fresh permutation of
    the dataset, so an epoch visits every pair once (and a batch holds a pair twice only when it
    spans two epochs). A pure function of (seed, step): a resumed run draws the same pairs."""
    return [pairs[_epoch_order(len(pairs), seed, i // len(pairs))[i % len(pairs)]]
            for i in range(step * n, (step + 1) * n)]


@functools.lru_cache(maxsize=4)
def _epoch_order(size: int, seed: int, epoch: int) -> list[int]:
    order = list(range(size))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order
