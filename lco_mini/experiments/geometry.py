"""Anisotropy and kernel alignment of a model's embeddings, per layer: what `analyze.py anisotropy`
and `analyze.py alignment` measure (the measures themselves are in lco_mini/analysis.py).

  world_groups / data_groups   which items: the world's held-out items (one per distinct caption)
                               or a jsonl's anchors against their positives
  embed_groups                 every item at every layer, with the embedding prompt and last-token
                               pooling, cached per model and items
  anisotropy_of / alignment_of the measures per layer and modality (alignment with permutation nulls)
  anisotropy_table / alignment_table   the final layer, as printed
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
import transformers

from lco_mini import analysis
from lco_mini.support import checkpoint, data
from lco_mini.tiny import tasks, world


class GeometryError(ValueError):
    """A model that cannot be loaded, or too few items to measure (analyze.py prints one line)."""


MEASURES = {"mutual_knn": lambda a, b, k: analysis.mutual_knn(a, b, k),
            "unbiased_cka": lambda a, b, k: analysis.cka(a, b, unbiased=True),
            "cknna": lambda a, b, k: analysis.cknna(a, b, k)}
CACHE_VERSION = 2  # part of every cache key: bump it when what is embedded changes, so old caches are not reused


# ----------------------------------------------------------------------------- which items

def world_groups(n: int, split: str, seed: int) -> dict[str, tuple[list[dict], list[dict]]]:
    """modality -> (media items, their canonical captions): one item per distinct combination."""
    groups = {}
    for modality in world.CAPTIONED:
        items = world.items(modality, split, min(n, world.n_combinations(modality, split)), seed)
        key = tasks.MEDIA_KEY[modality]
        groups[modality] = ([{key: item.media} for item in items], [{"text": item.captions[0]} for item in items])
    return groups


def data_groups(path: str, n: int) -> dict[str, tuple[list[dict], list[dict]]]:
    """anchor kind ("text", "image", "image+text" ...) -> (anchors, positives), first n distinct of each."""
    pairs, _ = data.read_jsonl(path)
    groups, seen = {}, set()
    for pair in pairs:
        kind = "+".join(k for k in ("image", "video", "audio", "text") if k in pair.anchor)
        anchors, positives = groups.setdefault(kind, ([], []))
        key = (kind, repr(sorted(pair.anchor.items())), repr(sorted(pair.positive.items())))
        if len(anchors) < n and key not in seen:  # a repeated pair would be its own tied neighbour
            seen.add(key)
            anchors.append(pair.anchor)
            positives.append(pair.positive)
    return groups


# ----------------------------------------------------------------------------- embeddings, cached

def stamp(path: Path) -> list:
    """What identifies a model folder's or data file's contents cheaply: names, sizes, mtimes."""
    if path.is_file():
        return [path.name, path.stat().st_size, path.stat().st_mtime_ns]
    if path.is_dir():
        return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(path.iterdir()) if f.is_file()]
    return []  # a hub id


def cache_path(args, model: str) -> Path:
    source = ["data", str(Path(args.data).resolve()), stamp(Path(args.data))] if args.data else \
        ["world", args.split, args.seed]
    key = json.dumps([CACHE_VERSION, str(Path(model).expanduser().resolve()) if Path(model).expanduser().exists()
                      else model, stamp(Path(model).expanduser()), source, args.n])
    return Path(args.out) / "cache" / f"{Path(model).name}-{hashlib.sha1(key.encode()).hexdigest()[:12]}.pt"


def embed_groups(args, model: str, groups: dict) -> dict[str, dict[str, torch.Tensor]]:
    """group -> {"media": [L + 1, n, D], "text": [L + 1, n, D]} at every layer, from the cache when
    it is there. Groups the backbone cannot take are left out, with one line each."""
    path = cache_path(args, model)
    try:
        cached = checkpoint.load(path, keys=("groups", "skipped", "processor"))
    except checkpoint.CheckpointError:  # cut short by a full disk, say: it is only a cache
        print(f"note: {path}: an unreadable cache entry; computing it again")
        cached = None
    if cached is None:
        from lco_mini import backbone  # lazy: a cached rerun needs no model
        from lco_mini.embedder import Embedder
        transformers.utils.logging.disable_progress_bar()  # our own progress bar says what happens
        transformers.utils.logging.set_verbosity_error()
        try:
            loaded, processor = backbone.load(model, device=args.device)
        except (OSError, ValueError) as error:
            raise GeometryError(f"cannot load {model!r}: {error}") from None
        kinds = backbone.input_kinds(processor)
        usable = {name: sides for name, sides in groups.items()
                  if all(set(item) - {"text"} <= set(kinds) for item in sides[0] + sides[1])}
        items = [item for media, text in usable.values() for item in media + text]
        print(f"{Path(model).name}: embedding {len(items)} items at every layer")
        embedder = Embedder(loaded, processor, batch_size=args.batch_size, device=args.device)
        vectors = embedder.embed(items, layers="all") if items else None
        cached, start = {"groups": {}, "skipped": sorted(set(groups) - set(usable)),
                         "processor": type(processor).__name__}, 0
        for name, (media, text) in usable.items():
            cached["groups"][name] = {"media": vectors[:, start:start + len(media)],
                                      "text": vectors[:, start + len(media):start + len(media) + len(text)]}
            start += len(media) + len(text)
        checkpoint.save(cached, path)
    for name in cached["skipped"]:
        print(f"{Path(model).name}: skipping {name}: {cached['processor']} cannot take it")
    return cached["groups"]


# ----------------------------------------------------------------------------- the measures

def anisotropy_of(embeddings: dict, from_world: bool) -> dict[str, list[float]]:
    """modality -> anisotropy per layer. "text" is the images' captions (world) or every positive (--data)."""
    sets = {name: group["media"] for name, group in embeddings.items()}
    if embeddings:
        texts = [embeddings["image"]["text"]] if from_world and "image" in embeddings else \
            [group["text"] for group in embeddings.values()]
        sets = {"text" if from_world else "positive": torch.cat(texts, dim=1), **sets}
    return {name: [analysis.anisotropy(layer) for layer in vectors] for name, vectors in sets.items()}


def alignment_of(embeddings: dict, k: int, null: int) -> dict[str, dict[str, list]]:
    """modality -> {measure: [per layer], measure_null: [[mean, std] per layer]}: medium layer l
    against caption layer l, as LCO-Embedding's kernel_alignment.py compares them."""
    results = {}
    for name, group in embeddings.items():
        results[name] = entry = {}
        for measure, score in MEASURES.items():
            fn = lambda a, b: score(a, b, k)  # noqa: E731
            entry[measure] = [_json_number(fn(a, b)) for a, b in zip(group["media"], group["text"])]
            entry[measure + "_null"] = [[_json_number(v) for v in analysis.permutation_null(fn, a, b, n=null)]
                                        for a, b in zip(group["media"], group["text"])]
    return results


def _json_number(value: float):
    return None if math.isnan(value) else round(value, 6)  # NaN (undefined) is JSON null


def check_sizes(groups: dict, args) -> None:
    """Enough items in every group for the measures (and for --k neighbours, for alignment)."""
    for name, (media, _) in groups.items():
        if len(media) <= args.k and args.command == "alignment":
            raise GeometryError(f"{name}: {len(media)} items, too few for --k {args.k} neighbours (k must be below "
                                f"the item count); lower --k or raise --n")
        if len(media) < 4:
            raise GeometryError(f"{name}: {len(media)} items; the measures need at least 4")


# ----------------------------------------------------------------------------- tables

def anisotropy_table(results: dict, items: dict) -> str:
    names = list(results)
    lines = ["final-layer anisotropy (mean cosine over distinct pairs):",
             f"{'modality':<12}{'items':>6}" + "".join(f"{name:>12}" for name in names)]
    for modality in dict.fromkeys(m for r in results.values() for m in r):
        row = f"{modality:<12}{items.get(modality, ''):>6}"
        for name in names:
            values = results[name].get(modality)
            row += f"{values[-1]:>12.3f}" if values else f"{'-':>12}"
        lines.append(row)
    return "\n".join(lines)


def alignment_table(results: dict, items: dict, k: int, null: int) -> str:
    names = list(results)
    lines = [f"final-layer alignment, medium <-> caption (k = {k}); in brackets the permutation null, "
             f"mean +- std of {null} shuffles:",
             f"{'modality':<10}{'items':>6} {'measure':<13}" + "".join(f"{name:>26}" for name in names)]
    for modality in dict.fromkeys(m for r in results.values() for m in r):
        for measure in MEASURES:
            row = f"{modality:<10}{items.get(modality, ''):>6} {measure:<13}"
            for name in names:
                entry = results[name].get(modality)
                row += f"{_cell(entry[measure][-1], entry[measure + '_null'][-1]):>26}" if entry else f"{'-':>26}"
            lines.append(row)
    return "\n".join(lines)


def _cell(score, null) -> str:
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    return f"{fmt(score)} ({fmt(null[0])} +- {fmt(null[1])})"
