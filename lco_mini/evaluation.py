"""Held-out retrieval on the synthetic world: does an embedding model match media to captions?

For each task the queries are n held-out items (attribute combinations never seen in
training) and the candidates are the distinct canonical captions of those items, so
chance level is 1 / candidates. A split with fewer combinations than n (audio has 24)
contributes several renderings of each: a different jitter, phase or noise, the same
caption. That keeps the estimate from resting on a couple of dozen queries. The
text->text task uses a paraphrase as the query, which is exactly what text-only
contrastive learning trains; every other task asks whether that training carried
over to a modality it never saw.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from lco_mini import world
from lco_mini.analysis import recall_at_k

# task name -> (world modality, how to embed the query side)
TASKS = {
    "text->text": ("image", "paraphrase"),
    "image->text": ("image", "image"),
    "video->text": ("video", "video"),
    "audio->text": ("audio", "audio"),
    "document->text": ("document", "image"),
}


def task_items(modality: str, n: int, seed: int) -> tuple[list, list[str], torch.Tensor]:
    """n held-out queries, their distinct canonical captions, and each query's caption index."""
    items = world.items(modality, "heldout", n, seed)
    captions = list(dict.fromkeys(item.captions[0] for item in items))
    index = {caption: i for i, caption in enumerate(captions)}
    return items, captions, torch.tensor([index[item.captions[0]] for item in items])


def embed_queries(embedder, items: list, kind: str) -> torch.Tensor:
    if kind == "paraphrase":
        return embedder.embed_texts([item.captions[1] for item in items])
    if kind == "image":
        return embedder.embed_images([item.media for item in items])
    if kind == "video":
        return embedder.embed_videos([item.media for item in items])
    if kind == "audio":
        return embedder.embed_audios([item.media for item in items])
    raise ValueError(f"unknown query kind {kind!r}")


def evaluate(embedder, n: int = 100, seed: int = 1234) -> dict[str, dict[str, float]]:
    """Recall@1/@5 per task on the held-out split; also reports n (queries) and candidates (chance = 1/candidates)."""
    results = {}
    for task, (modality, kind) in TASKS.items():
        items, captions, targets = task_items(modality, n, seed)
        queries = embed_queries(embedder, items, kind)
        scores = recall_at_k(queries, embedder.embed_texts(captions), targets)
        results[task] = {**scores, "n": len(items), "candidates": len(captions)}
    return results


def format_table(runs: dict[str, dict[str, dict[str, float]]]) -> str:
    """A plain-text table: one row per task, R@1 / R@5 columns per run."""
    names = list(runs)
    tasks = list(next(iter(runs.values())))
    header = f"{'task':<16}" + "".join(f"{name:>24}" for name in names) + f"{'chance R@1':>12}"
    lines = [header, f"{'':<16}" + "".join(f"{'R@1':>12}{'R@5':>12}" for _ in names), "-" * len(header)]
    for task in tasks:
        row = f"{task:<16}"
        for name in names:
            r = runs[name][task]
            row += f"{100 * r['R@1']:>12.1f}{100 * r['R@5']:>12.1f}"
        row += f"{100 / runs[names[0]][task]['candidates']:>12.1f}"
        lines.append(row)
    return "\n".join(lines)


def save(runs: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(runs, indent=2) + "\n")
