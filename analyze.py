"""Why text-only contrastive learning reaches images, audio and video: the paper's analysis.

    python analyze.py anisotropy            # after `python train.py`: out/base, out/merged, out/control
    python analyze.py alignment             # mutual kNN, unbiased CKA, CKNNA, each with a permutation null
    python analyze.py anisotropy --model out/base --model out/merged --n 100
    python analyze.py alignment --model Qwen/Qwen2.5-Omni-3B --data pairs.jsonl   # anchors vs positives
    python analyze.py grsl                  # the Generation-Representation Scaling Law on out/'s ladder
    python analyze.py grsl --quick          # 3 rungs, fewer queries and CL steps (a few minutes)

Generative pretraining already aligns the modalities inside an MLLM; text-only contrastive
learning (CL) then makes that alignment usable for every modality at once. Two measures show
it, at every layer (last-token pooling with the embedding prompt, as the embeddings are made):
  anisotropy   the mean cosine between distinct items of one modality. Raw MLLM states crowd
               into a narrow cone (near 1); CL spreads the text embeddings out, and the paper's
               finding is that images, audio and video spread out too, although CL saw none.
  alignment    do an item and its caption have the same neighbours in their own modality?
               (mutual k-NN, k = 10; unbiased CKA; CKNNA). Raw scores grow with dimension and
               anisotropy, so each comes with a permutation null: the score of shuffled pairs.
  grsl         the paper's scaling law: the better a model generates, the better it represents
               after text-only CL. The rungs are the tiny pretraining at increasing steps (the
               base-step{N}/ that train.py leaves, and base/); each gets the same text-only CL
               as the run's; caption R@1 (generation) against X->text R@1 (representation),
               fitted per modality with bootstrap intervals over the held-out queries.
The data: the synthetic world's held-out items, one per distinct caption (items sharing a
caption would be tied neighbours and inflate the overlap), or --data: a jsonl in the official
format, its anchors against their positives, grouped by the anchor's kind.
Outputs in --out (default out/analysis): anisotropy.json/.png, alignment.json/.png,
grsl.json/.png (+ grsl-train.log, the CL log lines), and cache/ (the embeddings, per model and
data, and the scores of each GRSL rung: a rerun, or one cut short, does not redo them).
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see train.py: idle threads sleep

import argparse
import contextlib
import hashlib
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import transformers
from tqdm.auto import tqdm

from lco_mini import analysis, checkpoint, data, ladder, plots, precision, runs, sources, tasks, world

MEASURES = {"mutual_knn": lambda a, b, k: analysis.mutual_knn(a, b, k),
            "unbiased_cka": lambda a, b, k: analysis.cka(a, b, unbiased=True),
            "cknna": lambda a, b, k: analysis.cknna(a, b, k)}
CACHE_VERSION = 1  # bump when what is embedded changes, so old caches are not reused


def fail(message: str):
    """A user mistake: one line on stderr, exit code 2, no traceback."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


class Parser(argparse.ArgumentParser):
    def error(self, message):
        fail(f"{message} (see --help)")


def get_args(argv=None) -> argparse.Namespace:
    p = Parser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n", 1)[1],
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["anisotropy", "alignment", "grsl"], help="what to measure")
    p.add_argument("--model", action="append", default=None, metavar="DIR",
                   help="a model folder or hub id (repeatable); default: base, merged and control of --run")
    p.add_argument("--run", default="out", help="the train.py output folder the default models come from (default: out)")
    p.add_argument("--data", default=None, help="pairs jsonl (official format) instead of the synthetic world")
    p.add_argument("--n", type=int, default=None,
                   help="items per modality at most; grsl: retrieval queries per modality (default: 300; grsl --quick: 100)")
    p.add_argument("--split", choices=world.SPLITS, default="heldout", help="world split (default: heldout)")
    p.add_argument("--seed", type=int, default=1234, help="which renderings of the world's items (default: 1234)")
    p.add_argument("--k", type=int, default=10, help="neighbours for mutual kNN and CKNNA (default: 10, as the paper)")
    p.add_argument("--null", type=int, default=20, help="shuffled pairings per permutation null (default: 20)")
    p.add_argument("--out", default="out/analysis", help="output folder (default: out/analysis)")
    p.add_argument("--device", default=None, help="cpu, cuda ... (default: cuda if available)")
    p.add_argument("--batch-size", type=int, default=32, help="items per forward pass (default: 32)")
    grsl = p.add_argument_group("grsl")
    grsl.add_argument("--quick", action="store_true", help="3 rungs (first, middle, last), 100 retrieval "
                      "queries, 12 probe items and 15 CL steps: a few minutes")
    grsl.add_argument("--probe-n", type=int, default=None,
                      help="captioning-probe items per modality (default: 27, as evaluation.captioning; quick: 12)")
    grsl.add_argument("--steps", type=int, default=None, help="CL steps on every rung (default: the run's; quick: 15)")
    grsl.add_argument("--boot", type=int, default=1000, help="bootstrap replicates of the fit (default: 1000)")
    args = p.parse_args(argv)
    args.n = args.n or (100 if args.command == "grsl" and args.quick else 300)
    args.probe_n = args.probe_n or (12 if args.quick else 27)
    for name, low in (("n", 4), ("k", 1), ("null", 2), ("batch_size", 1), ("probe_n", 2), ("boot", 10)):
        if getattr(args, name) < low:
            p.error(f"--{name.replace('_', '-')} must be at least {low}")
    return args


# ----------------------------------------------------------------------------- which models, which items

def model_list(args) -> list[str]:
    """--model as given, else the run's base, merged and (if train.py made one) control model."""
    if args.model:
        models = args.model
    else:
        run = Path(args.run)
        models = [str(run / "base"), str(run / "merged")] + ([str(run / "control")] if (run / "control").exists() else [])
        for model in models[:2]:
            if not Path(model).is_dir():
                fail(f"{model}: no such folder; run `python train.py` first (or pass --run / --model)")
    for model in models:
        try:
            sources.model_source(model)
        except OSError as error:
            fail(str(error))
    return models


def labels(models: list[str]) -> list[str]:
    """A short name per model: the folder name, or the whole path where two names collide."""
    names = [Path(m).name for m in models]
    return [name if names.count(name) == 1 else model for name, model in zip(names, models)]


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

def _stamp(path: Path) -> list:
    """What identifies a model folder's or data file's contents cheaply: names, sizes, mtimes."""
    if path.is_file():
        return [path.name, path.stat().st_size, path.stat().st_mtime_ns]
    if path.is_dir():
        return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(path.iterdir()) if f.is_file()]
    return []  # a hub id


def cache_path(args, model: str) -> Path:
    source = ["data", str(Path(args.data).resolve()), _stamp(Path(args.data))] if args.data else \
        ["world", args.split, args.seed]
    key = json.dumps([CACHE_VERSION, str(Path(model).expanduser().resolve()) if Path(model).expanduser().exists()
                      else model, _stamp(Path(model).expanduser()), source, args.n])
    return Path(args.out) / "cache" / f"{Path(model).name}-{hashlib.sha1(key.encode()).hexdigest()[:12]}.pt"


def embed_groups(args, model: str, groups: dict) -> dict[str, dict[str, torch.Tensor]]:
    """group -> {"media": [L + 1, n, D], "text": [L + 1, n, D]} at every layer, from the cache when
    it is there. Groups the backbone cannot take are left out, with one line each."""
    path = cache_path(args, model)
    try:
        cached = checkpoint.load(path, keys=("groups", "skipped", "processor"))
    except checkpoint.CheckpointError as error:  # cut short by a full disk, say: it is only a cache
        print(f"{error}; computing it again")
        cached = None
    if cached is None:
        from lco_mini import backbone  # lazy: a cached rerun needs no model
        transformers.utils.logging.disable_progress_bar()  # our own progress bar says what happens
        transformers.utils.logging.set_verbosity_error()
        try:
            loaded, processor = backbone.load(model, device=args.device)
        except (OSError, ValueError) as error:
            fail(f"cannot load {model!r}: {error}")
        kinds = backbone.input_kinds(processor)
        usable = {name: sides for name, sides in groups.items()
                  if all(set(item) - {"text"} <= set(kinds) for item in sides[0] + sides[1])}
        items = [item for media, text in usable.values() for item in media + text]
        print(f"{Path(model).name}: embedding {len(items)} items at every layer")
        embedder = backbone.Embedder(loaded, processor, batch_size=args.batch_size, device=args.device)
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
    for name, (media, _) in groups.items():
        if len(media) <= args.k and args.command == "alignment":
            fail(f"{name}: {len(media)} items, too few for --k {args.k} neighbours (k must be below the item count); "
                 f"lower --k or raise --n")
        if len(media) < 4:
            fail(f"{name}: {len(media)} items; the measures need at least 4")


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


# ----------------------------------------------------------------------------- grsl: the ladder

def cl_args(args, config: dict):
    """train.py's options for the CL of every rung: the run's own contrastive options (seed, pairs,
    steps, lr, LoRA ...), with --steps or --quick's 15 steps if asked, and this machine's precision."""
    import train  # the sibling script: the rungs get exactly its contrastive stage

    cl = train.get_args(["--seed", str(config["seed"]), "--no-eval"])
    vars(cl).update({key: config[key] for key in runs.RUN_KEYS["contrastive"] if key in config and key != "precision"})
    steps = args.steps or (15 if args.quick else None)
    if steps:
        cl.steps, cl.warmup = steps, min(100, max(1, steps // 10))
    cl.log_every, cl.device = 10 ** 9, args.device  # only the first and last step's lines, into grsl-train.log
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cl.precision, why = precision.choose(precision.DEFAULT, device)
    if cl.precision != config.get("precision", cl.precision):
        print(f"grsl: precision {cl.precision} here ({why}); the run used {config['precision']}, so the last rung "
              f"will not reproduce its (b) exactly")
    return cl, device


def _rung_cache(args, cl, folder: Path) -> Path:
    """Where one rung's scores are cached: keyed by the folder's contents and every option that shapes them."""
    options = [CACHE_VERSION, "grsl", str(folder.resolve()), _stamp(folder), args.n, args.probe_n,
               {key: getattr(cl, key) for key in runs.RUN_KEYS["contrastive"]}]
    digest = hashlib.sha1(json.dumps(options, default=str).encode()).hexdigest()[:12]
    return Path(args.out) / "cache" / f"grsl-{folder.name}-{digest}.json"


def rung_trainer(args, cl, device):
    """folder -> the run's text-only CL on it (train.py's own stage), LoRA merged; its log lines go
    to grsl-train.log. Every rung starts from the RNG state the run's CL started from (the
    pretraining checkpoint's), so all get the same LoRA initialisation and the last rung is the run's (b)."""
    import train
    from lco_mini import lora

    state = checkpoint.load(Path(args.run) / "pretrain.ckpt.pt")
    if state is None:
        print(f"grsl: no {Path(args.run) / 'pretrain.ckpt.pt'}: every rung's CL starts from seed {cl.seed} instead")

    def contrastive(folder: Path):
        checkpoint.set_rng_state(state["rng"]) if state is not None else torch.manual_seed(cl.seed)
        scratch = Path(tempfile.mkdtemp(prefix="lco_mini_grsl_"))  # the CL's checkpoints, deleted after
        try:
            with open(Path(args.out) / "grsl-train.log", "a") as log, contextlib.redirect_stdout(log):
                print(f"--- {folder}")
                model, processor = train.run_contrastive(cl, device, folder, scratch, None)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return lora.merge_lora(model), processor
    return contrastive


def rung_result(args, cl, device, contrastive, step: int, folder: Path, bar) -> dict:
    """One rung's scores, from the cache when this rung was measured with the same options."""
    cache = _rung_cache(args, cl, folder)
    if cache.is_file():
        bar.update(ladder.work(args.probe_n, cl.steps))
        return json.loads(cache.read_text())
    result = ladder.measure_rung(folder, step, contrastive, device, probe_n=args.probe_n, n=args.n,
                                 seed=cl.seed + 1234, steps=cl.steps, batch_size=args.batch_size,
                                 max_text_tokens=cl.max_text_tokens, bar=bar)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.with_suffix(".partial").write_text(json.dumps(result))
    os.replace(cache.with_suffix(".partial"), cache)  # a cache file that exists is complete
    return result


def grsl(args) -> None:
    """The ladder, each rung measured (or read from the cache), the fit, grsl.json/.png, the table."""
    try:
        rungs = ladder.rungs(Path(args.run), quick=args.quick)
    except ladder.LadderError as error:
        fail(str(error))
    config = json.loads((Path(args.run) / runs.RUN_CONFIG).read_text())
    cl, device = cl_args(args, config)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    print(f"grsl: {len(rungs)} rungs ({', '.join(f.name for _, f in rungs)}); each: captioning probe on "
          f"{args.probe_n} items per modality, text-only CL ({cl.steps} steps, lr {cl.lr}, seed {cl.seed}), "
          f"retrieval on {args.n} queries per modality")
    contrastive = rung_trainer(args, cl, device)
    with tqdm(total=len(rungs) * ladder.work(args.probe_n, cl.steps),
              bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining}") as bar:
        results = [rung_result(args, cl, device, contrastive, step, folder, bar) for step, folder in rungs]
    rows, fits = ladder.points(results), ladder.fit(results, n_boot=args.boot)
    report = {"points": rows, "fit": fits, "run": args.run, "rungs": [f.name for _, f in rungs],
              "options": {"retrieval_queries": args.n, "probe_items": args.probe_n, "cl_steps": cl.steps,
                          "cl_lr": cl.lr, "seed": cl.seed, "precision": cl.precision, "quick": args.quick}}
    (out / "grsl.json").write_text(json.dumps(report, indent=1) + "\n")
    plots.grsl_figure(rows, fits, ladder.PAPER_POINTS, out / "grsl.png")
    print("\n" + ladder.table(rows, fits))
    print(f"\nwrote {out / 'grsl.json'} and {out / 'grsl.png'}")


# ----------------------------------------------------------------------------- main

def main(argv=None) -> None:
    args = get_args(argv)
    if args.command == "grsl":
        return grsl(args)
    models = model_list(args)
    try:
        groups = data_groups(args.data, args.n) if args.data else world_groups(args.n, args.split, args.seed)
    except data.DataError as error:
        fail(str(error))
    check_sizes(groups, args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results, items = {}, {name: len(media) for name, (media, _) in groups.items()}
    for name, model in zip(labels(models), models):
        embeddings = embed_groups(args, model, groups)
        if args.command == "anisotropy":
            results[name] = anisotropy_of(embeddings, from_world=not args.data)
        else:
            results[name] = alignment_of(embeddings, args.k, args.null)
    if "image" in items and not args.data:
        items["text"] = items["image"]
    if args.data:
        items["positive"] = sum(items.values())
    source = {"data": args.data} if args.data else {"world": args.split, "seed": args.seed}
    report = {"models": results, "n": args.n, "items": items, "source": source, "model_paths": dict(zip(labels(models), models))}
    if args.command == "anisotropy":
        table = anisotropy_table(results, items)
        plots.anisotropy_figure(results, out / "anisotropy.png")
    else:
        report.update(k=args.k, null_shuffles=args.null)
        table = alignment_table(results, items, args.k, args.null)
        plots.alignment_figure(results, out / "alignment.png")
    (out / f"{args.command}.json").write_text(json.dumps(report, indent=1) + "\n")
    print("\n" + table)
    print(f"\nwrote {out / (args.command + '.json')} and {out / (args.command + '.png')}")


if __name__ == "__main__":
    main()
