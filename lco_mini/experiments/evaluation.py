"""Held-out retrieval on the synthetic world: does an embedding model match media to captions?

For each task the queries are n held-out items (attribute combinations never seen in
training) and the candidates are the distinct canonical captions of those items, so
chance level is 1 / candidates. A split with fewer combinations than n (audio has 27)
contributes several renderings of each: a different jitter, phase or noise, the same
caption. That keeps the estimate from resting on a couple of dozen queries. The
text->text task uses a paraphrase as the query, which is exactly what text-only
contrastive learning trains; every other task asks whether that training carried
over to a modality it never saw.

captioning() asks the generative side instead: does the base model *know* what is in a
held-out item? It ranks the candidate captions by their likelihood as the answer to
"Describe the above audio." and reports how often the top caption is right, per
attribute. Text-only contrastive learning can only bring out what this already knows.

    python -m lco_mini.experiments.evaluation out/merged                       # the retrieval table
    python -m lco_mini.experiments.evaluation out/base --captioning --n 27     # the captioning probe
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from lco_mini.tiny import tasks, world
from lco_mini.analysis import mean_reciprocal_rank, recall_at_k, similarity, target_ranks

# task name -> (world modality, how to embed the query side)
TASKS = {
    "text->text": ("image", "paraphrase"),
    "image->text": ("image", "image"),
    "video->text": ("video", "video"),
    "audio->text": ("audio", "audio"),
    "document->text": ("document", "image"),
}


def task_items(modality: str, n: int, seed: int, split: str = "heldout",
               script: str = "latin") -> tuple[list, list[str], torch.Tensor]:
    """n queries from `split`, their distinct canonical captions, and each query's caption index.
    script: "alien" draws documents in the invented script (analyze.py continual)."""
    items = world.items(modality, split, n, seed, script=script)
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


def embed_task(embedder, task: str, n: int, seed: int, split: str = "heldout", script: str = "latin"):
    """One retrieval task's queries and candidates: (items, captions, targets, query and caption embeddings)."""
    modality, kind = TASKS[task]
    items, captions, targets = task_items(modality, n, seed, split, script)
    return items, captions, targets, embed_queries(embedder, items, kind), embedder.embed_texts(captions)


def retrieval_ranks(embedder, task: str, n: int = 300, seed: int = 1234, split: str = "heldout",
                    script: str = "latin") -> torch.Tensor:
    """0-based rank of each query's caption in `task` (ties pessimistic, as R@k): per-query scores,
    so analyze.py grsl can bootstrap over queries. (rank < k).mean() is evaluate()'s R@k."""
    _, _, targets, queries, candidates = embed_task(embedder, task, n, seed, split, script)
    return target_ranks(queries, candidates, targets)


def evaluate(embedder, n: int = 300, seed: int = 1234, split: str = "heldout",
             attributes: bool = False) -> dict[str, dict[str, float]]:
    """Recall@1/@5 per task; also reports n (queries) and candidates (chance = 1/candidates).

    split="train" asks the same of combinations the base model was pretrained on: if a
    modality transfers there but not on the held-out split, what fails is composition (a
    new combination of known attributes), not the alignment that contrastive learning uses.
    attributes=True adds, per attribute, how often the top-ranked caption has it right."""
    # what the backbone takes (Embedder.kinds); a stand-in embedder without it takes everything
    results, takes = {}, getattr(embedder, "kinds", ("text", "image", "video", "audio"))
    for task, (modality, kind) in TASKS.items():
        needs = "text" if kind == "paraphrase" else kind
        if needs not in takes:  # audio for a VL model: skipped, and said so, instead of a crash mid-run
            results[task] = {"skipped": f"{type(getattr(embedder, 'processor', embedder)).__name__} takes no {needs}"}
            print(f"evaluation: skipping {task}: {results[task]['skipped']}")
            continue
        items, captions, targets, queries, candidates = embed_task(embedder, task, n, seed, split)
        scores = recall_at_k(queries, candidates, targets)
        results[task] = {**scores, "n": len(items), "candidates": len(captions)}
        if attributes and modality != "document":
            top = similarity(queries, candidates).argmax(1)
            results[task].update(attribute_accuracy(items, captions, top))
    return results


def _kind(item: dict) -> str:
    """'image', 'text', 'image+text', ...: the modalities an item holds."""
    return "+".join(sorted(item))


def _key(item: dict) -> tuple:
    return tuple(sorted((k, str(v)) for k, v in item.items()))


def _candidates(pairs: list, hard_negatives: bool) -> list[dict]:
    """The distinct positives (and hard negatives) of a file, in first-seen order."""
    candidates, seen = [], set()
    for pair in pairs:
        for item in [pair.positive] + ([pair.negative] if hard_negatives and pair.negative else []):
            if _key(item) not in seen:
                seen.add(_key(item))
                candidates.append(item)
    return candidates


def check_pairs(pairs: list, hard_negatives: bool, path) -> None:
    """Evaluation pairs need at least two candidates to rank (checked before any training)."""
    if len(_candidates(pairs, hard_negatives)) < 2:
        raise ValueError(f"{path}: fewer than 2 distinct positives (and hard negatives) to rank")


def evaluate_pairs(embedder, pairs: list, hard_negatives: bool = True) -> dict[str, dict[str, float]]:
    """Retrieval on the user's own held-out pairs (data.read_jsonl): each anchor looks for its
    positive among every distinct positive of the file, plus the hard negatives when present.
    One row per anchor kind -> positive kind: R@1/5/10, MRR, n and candidates."""
    check_pairs(pairs, hard_negatives, "evaluation data")
    candidates = _candidates(pairs, hard_negatives)
    index = {_key(item): i for i, item in enumerate(candidates)}
    candidate_vectors = embedder.embed(candidates)
    groups = {}
    for pair in pairs:
        groups.setdefault(f"{_kind(pair.anchor)}->{_kind(pair.positive)}", []).append(pair)
    results = {}
    for task, group in groups.items():
        queries = embedder.embed([pair.anchor for pair in group])
        targets = torch.tensor([index[_key(pair.positive)] for pair in group])
        results[f"data {task}"] = {**recall_at_k(queries, candidate_vectors, targets, ks=(1, 5, 10)),
                                   "MRR": mean_reciprocal_rank(queries, candidate_vectors, targets),
                                   "n": len(group), "candidates": len(candidates)}
    return results


def attribute_accuracy(items: list, captions: list[str], top: torch.Tensor) -> dict[str, float]:
    """For each attribute: the share of items whose top-ranked caption has that attribute right.

    The attributes that vary among the candidates are the ones that count; a value well below
    chance means a systematic confusion (e.g. every low sound matched to a "high" caption)."""
    by_caption = {item.captions[0]: item.attributes for item in items}
    result = {}
    for name in dict.fromkeys(k for item in items for k in item.attributes if k != "kind"):
        right = [by_caption[captions[t]].get(name) == item.attributes[name]
                 for t, item in zip(top.tolist(), items) if name in item.attributes]
        result[name] = sum(right) / len(right)
    return result


def format_table(runs: dict[str, dict[str, dict[str, float]]]) -> str:
    """A plain-text table: one row per task, R@1 / R@5 columns per run, each run's columns as wide
    as its name."""
    names = list(runs)
    task_names = list(next(iter(runs.values())))
    width = max([16] + [len(task) + 2 for task in task_names])
    cols = {name: max(24, len(name) + 2) for name in names}  # R@1 and R@5 share a run's width
    header = f"{'task':<{width}}" + "".join(f"{name:>{cols[name]}}" for name in names) + f"{'chance R@1':>12}"
    lines = [header, f"{'':<{width}}" + "".join(f"{'R@1':>{cols[n] - cols[n] // 2}}{'R@5':>{cols[n] // 2}}"
                                                for n in names), "-" * len(header)]
    for task in task_names:
        row = f"{task:<{width}}"
        for name in names:
            r, col = runs[name][task], cols[name]
            row += (f"{'skipped':>{col}}" if "skipped" in r
                    else f"{100 * r['R@1']:>{col - col // 2}.1f}{100 * r['R@5']:>{col // 2}.1f}")
        first = runs[names[0]][task]
        row += f"{'':>12}" if "skipped" in first else f"{100 / first['candidates']:>12.1f}"
        lines.append(row)
    return "\n".join(lines)


def save(runs: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(runs, indent=2) + "\n")


# ----------------------------------------------------------------------------- the captioning probe

def caption_nll(model, processor, item_input: dict, captions: list[str]) -> torch.Tensor:
    """Summed negative log-likelihood of each caption as the answer to item_input (one batch)."""
    from lco_mini import backbone  # lazy: transformers is only needed here
    batch = backbone.build_inputs(processor, [item_input] * len(captions), targets=captions)
    labels = batch.pop("labels")[:, 1:]
    with torch.no_grad():
        logits = model(**batch.to(model.device)).logits[:, :-1].float().cpu()
    return F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none").sum(1)


def captioning(model, processor, modality: str, n: int = 27, seed: int = 1234,
               split: str = "heldout") -> dict[str, float]:
    """Generative probe: for n items of `split`, rank the distinct candidate captions by likelihood
    under tasks.DESCRIBE[modality]; R@1 and, per attribute, how often the top caption has it right."""
    items, captions, targets, nll = caption_nlls(model, processor, modality, n, seed, split)
    top = nll.argmin(1)
    return {"R@1": (top == targets).double().mean().item(), "n": len(items), "candidates": len(captions),
            **attribute_accuracy(items, captions, top)}


def caption_nlls(model, processor, modality: str, n: int = 27, seed: int = 1234, split: str = "heldout",
                 progress=None, script: str = "latin"):
    """The probe's raw scores: (items, distinct captions, each item's caption index, NLL [n, captions]
    of every caption as the answer to tasks.DESCRIBE[modality] about each item). `progress`, if
    given, is called once per item (a progress bar's update)."""
    items, captions, targets = task_items(modality, n, seed, split, script)
    key = tasks.MEDIA_KEY[modality]
    rows = []
    for item in items:
        rows.append(caption_nll(model, processor, {key: item.media, "instruction": tasks.DESCRIBE[modality]}, captions))
        if progress:
            progress()
    return items, captions, targets, torch.stack(rows)


def format_attributes(result: dict) -> str:
    return ", ".join(f"{k} {100 * v:.0f}%" for k, v in result.items()
                     if isinstance(v, float) and k not in ("R@1", "R@5", "n", "candidates"))


def main(argv=None) -> None:
    from lco_mini.support.cli import Parser, fail

    p = Parser(description="Held-out evaluation on the synthetic world (see the module docstring).")
    p.add_argument("model", help="a model folder written by train.py (out/base, out/merged) or any supported backbone")
    p.add_argument("--n", type=int, default=300, help="queries per task (default 300, as train.py; the captioning probe: use ~27)")
    p.add_argument("--seed", type=int, default=1234, help="which renderings of the combinations")
    p.add_argument("--split", choices=world.SPLITS, default="heldout",
                   help="heldout (default): combinations never trained on; train: ones seen in pretraining")
    p.add_argument("--attributes", action="store_true",
                   help="also print, per attribute, how often the top-ranked caption has it right")
    p.add_argument("--captioning", action="store_true", help="run the generative captioning probe instead of retrieval")
    p.add_argument("--data", default=None,
                   help="instead of the world: your own held-out pairs (jsonl, train.py's format): each anchor "
                        "retrieves its positive among all positives (+ hard negatives) of the file")
    p.add_argument("--device", default=None, help="cpu, cuda ... (default: cuda if available)")
    args = p.parse_args(argv)
    if args.n < 2:
        p.error("--n must be at least 2")
    from lco_mini import backbone
    from lco_mini.embedder import Embedder
    try:
        model, processor = backbone.load(args.model, device=args.device)
    except (OSError, ValueError) as error:
        fail(f"cannot load {args.model!r}: {' '.join(str(error).split())}")
    if args.data:
        from lco_mini.support import data
        try:
            pairs, _ = data.read_jsonl(args.data)
            data.check_processor_takes(pairs, processor, args.data)
            results = evaluate_pairs(Embedder(model, processor, device=args.device), pairs)
        except (data.DataError, ValueError) as error:
            fail(str(error))
        print(format_table({args.model: results}))
        for task, r in results.items():
            print(f"{task:<24} R@10 {100 * r['R@10']:5.1f}  MRR {r['MRR']:.3f}")
        return
    if not args.captioning:
        embedder = Embedder(model, processor, device=args.device)
        results = evaluate(embedder, n=args.n, seed=args.seed, split=args.split, attributes=args.attributes)
        print(format_table({f"{args.model} ({args.split})": results}))
        for task, result in results.items():
            attributes = format_attributes(result)  # empty without --attributes, and for documents
            if attributes:
                print(f"{task:<16} top caption right on: {attributes}")
        return
    for modality in ("image", "video", "audio", "document"):
        if tasks.MEDIA_KEY[modality] not in backbone.input_kinds(processor):
            print(f"{modality:<8} skipped: {type(processor).__name__} takes no {modality}")
            continue
        result = captioning(model, processor, modality, n=args.n, seed=args.seed, split=args.split)
        print(f"{modality:<8} caption R@1 {100 * result['R@1']:5.1f}% of {result['n']} "
              f"({result['candidates']} candidates) | top caption right on: {format_attributes(result)}")


if __name__ == "__main__":
    main()
