"""Why text-only contrastive learning reaches images, audio and video: the paper's analysis.

    python analyze.py anisotropy            # after `python train.py`: out/base, out/merged, out/control
    python analyze.py alignment             # mutual kNN, unbiased CKA, CKNNA, each with a permutation null
    python analyze.py anisotropy --model out/base --model out/merged --n 100
    python analyze.py alignment --model Qwen/Qwen2.5-Omni-3B --data pairs.jsonl   # anchors vs positives
    python analyze.py grsl                  # the Generation-Representation Scaling Law on out/'s ladder
    python analyze.py grsl --quick          # 3 rungs, fewer queries and CL steps (a few minutes)
    python analyze.py continual             # the SeaDoc analogue: continual pretraining on an unfamiliar script

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
  continual    the paper's SeaDoc experiment: document retrieval in a script the base never
               read (the world's invented "alien" digits), after text-only CL, with and without
               a continual generative stage of reading that script first (lco_mini/experiments/continual.py).
The data: the synthetic world's held-out items, one per distinct caption (items sharing a
caption would be tied neighbours and inflate the overlap), or --data: a jsonl in the official
format, its anchors against their positives, grouped by the anchor's kind.
Outputs in --out (default out/analysis): anisotropy.json/.png, alignment.json/.png,
grsl.json/.png, continual.json/.png (+ grsl-train.log, continual-train.log: the training log
lines), and cache/ (the embeddings per model and data, the scores of each GRSL rung and each
continual arm, the continually pretrained base: a rerun, or one cut short, does not redo them).
"""
from __future__ import annotations

from lco_mini.support import cli as command_line

command_line.spin_briefly()  # how idle OpenMP threads wait is read when torch loads: set it first

import argparse  # noqa: E402 (after the OpenMP setting)
import contextlib  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from lco_mini.experiments import continual, geometry, ladder, plots, rerun  # noqa: E402
from lco_mini.support import checkpoint, data, lock, runs, sources  # noqa: E402
from lco_mini.support.cli import fail  # noqa: E402
from lco_mini.tiny import world  # noqa: E402


def get_args(argv=None) -> argparse.Namespace:
    p = command_line.Parser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n", 1)[1],
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["anisotropy", "alignment", "grsl", "continual"], help="what to measure")
    p.add_argument("--model", action="append", default=None, metavar="DIR",
                   help="a model folder or hub id (repeatable); default: base, merged and control of --run")
    p.add_argument("--run", default="out", help="the train.py output folder the default models come from (default: out)")
    p.add_argument("--data", default=None, help="pairs jsonl (official format) instead of the synthetic world")
    p.add_argument("--n", type=int, default=None,
                   help="items per modality at most; grsl, continual: retrieval queries per modality "
                        "(default: 300; with --quick: 100)")
    p.add_argument("--split", choices=world.SPLITS, default="heldout", help="world split (default: heldout)")
    p.add_argument("--seed", type=int, default=1234, help="which renderings of the world's items (default: 1234)")
    p.add_argument("--k", type=int, default=10, help="neighbours for mutual kNN and CKNNA (default: 10, as the paper)")
    p.add_argument("--null", type=int, default=20, help="shuffled pairings per permutation null (default: 20)")
    p.add_argument("--out", default="out/analysis", help="output folder (default: out/analysis)")
    p.add_argument("--device", default=None, help="cpu, cuda ... (default: cuda if available)")
    p.add_argument("--batch-size", type=int, default=32, help="items per forward pass (default: 32)")
    grsl = p.add_argument_group("grsl and continual")
    grsl.add_argument("--quick", action="store_true", help="fewer of everything, a few minutes: grsl 3 rungs (first, "
                      "middle, last); continual 100 steps; both 100 retrieval queries, 12 probe items, 15 CL steps")
    grsl.add_argument("--probe-n", type=int, default=None,
                      help="captioning-probe items per modality (default: 27, as evaluation.captioning; quick: 12)")
    grsl.add_argument("--steps", type=int, default=None, help="CL steps on every base (default: the run's; quick: 15)")
    grsl.add_argument("--boot", type=int, default=1000, help="bootstrap replicates of intervals (default: 1000)")
    grsl.add_argument("--continual-steps", type=int, default=None,
                      help="continual: steps of reading the alien script (default: 300; quick: 100)")
    grsl.add_argument("--continual-lr", type=float, default=4e-4,
                      help="continual: peak lr of that stage (default: 4e-4, the tiny pretraining's)")
    grsl.add_argument("--continual-share", type=float, default=0.5,
                      help="continual: share of each batch that reads the alien script; the rest replays the "
                           "run's pretraining mix (default: 0.5)")
    args = p.parse_args(argv)
    if args.command in ("grsl", "continual"):
        unused = [flag for flag, value in (("--model", args.model), ("--data", args.data)) if value]
        if unused:
            p.error(f"{args.command} measures the bases of --run (default: out), so it takes no "
                    f"{' or '.join(unused)}")
    args.n = args.n or (100 if args.command in ("grsl", "continual") and args.quick else 300)
    args.probe_n = args.probe_n or (12 if args.quick else 27)
    if not (args.continual_lr > 0 and math.isfinite(args.continual_lr)):
        p.error(f"--continual-lr must be a positive number; got {args.continual_lr}")
    if not 0 < args.continual_share <= 1:
        p.error(f"--continual-share must be in (0, 1]; got {args.continual_share}")
    for name, low in (("n", 4), ("k", 1), ("null", 2), ("batch_size", 1), ("probe_n", 2), ("boot", 10),
                      ("steps", 1), ("continual_steps", 1)):
        if getattr(args, name) is not None and getattr(args, name) < low:
            p.error(f"--{name.replace('_', '-')} must be at least {low}")
    return args


# ----------------------------------------------------------------------------- which models

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


# ----------------------------------------------------------------------------- grsl: the ladder

def _cache_key(*parts) -> str:
    return hashlib.sha1(json.dumps([geometry.CACHE_VERSION, *parts], default=str).encode()).hexdigest()[:12]


def _cache_entry(path: Path) -> dict | None:
    """A cached JSON result, or None when there is none; an entry that cannot be read (cut short,
    emptied, edited) is computed again, with a note naming it."""
    if not path.is_file():
        return None
    try:
        entry = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        entry = error
    if isinstance(entry, dict) and entry:
        return entry
    print(f"note: {path}: an unreadable cache entry ({' '.join(str(entry).split())[:80] or 'empty'}); computing it again")
    return None


def _cached(path: Path, compute, bar=None, work: int = 0) -> dict:
    """compute()'s JSON result, kept at `path` (written whole or not at all): a rerun, or one cut
    short, does not compute it again (the progress bar moves by `work` instead)."""
    entry = _cache_entry(path)
    if entry is not None:
        if bar is not None:
            bar.update(work)
        return entry
    result = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".partial").write_text(json.dumps(result))
    os.replace(path.with_suffix(".partial"), path)  # a cache file that exists is complete
    return result


def _measured(args, cl, kind: str, folder: Path) -> Path:
    """Where the scores of one model folder are cached: keyed by its contents and every option that shapes them."""
    key = _cache_key(kind, str(folder.resolve()), geometry.stamp(folder), args.n, args.probe_n,
                     {key: getattr(cl, key) for key in runs.RUN_KEYS["contrastive"]})
    return Path(args.out) / "cache" / f"{kind}-{folder.name}-{key}.json"


def rung_result(args, cl, device, contrastive, step: int, folder: Path, bar) -> dict:
    """One rung's scores, from the cache when this rung was measured with the same options."""
    cache = _measured(args, cl, "grsl", folder)
    return _cached(cache, lambda: ladder.measure_rung(
        folder, step, contrastive, device, probe_n=args.probe_n, n=args.n, seed=cl.seed + 1234, steps=cl.steps,
        batch_size=args.batch_size, max_text_tokens=cl.max_text_tokens, bar=bar),
        bar, ladder.work(args.probe_n, cl.steps))


def _run_config(run: Path) -> dict:
    """The run_config.json of a train.py run that left a base/, or one line and exit 2."""
    if not (run / "base").is_dir() or not (run / runs.RUN_CONFIG).is_file():
        fail(f"{run}: no base/ and {runs.RUN_CONFIG}; run `python train.py` first (or pass --run)")
    return json.loads((run / runs.RUN_CONFIG).read_text())


def _experiment(args) -> tuple[dict, object, torch.device, Path]:
    """What grsl and continual start with: the run's options, the CL every base will get (the run's
    own, or --steps / --quick's 15 steps), the device, and the output folder, made."""
    config = _run_config(Path(args.run))
    try:
        cl, device = rerun.cl_args(config, args.device, args.steps or (15 if args.quick else None))
    except ValueError as error:  # a run_config.json without the contrastive options
        fail(str(error))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    transformers.utils.logging.disable_progress_bar()  # our own progress bar says what happens
    transformers.utils.logging.set_verbosity_error()
    return config, cl, device, out


BAR = "{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining}"


def grsl(args) -> None:
    """The ladder, each rung measured (or read from the cache), the fit, grsl.json/.png, the table."""
    try:
        rungs = ladder.rungs(Path(args.run), quick=args.quick)
    except ladder.LadderError as error:
        fail(str(error))
    _, cl, device, out = _experiment(args)
    print(f"grsl: {len(rungs)} rungs ({', '.join(f.name for _, f in rungs)}); each: captioning probe on "
          f"{args.probe_n} items per modality, text-only CL ({cl.steps} steps, lr {cl.lr}, seed {cl.seed}), "
          f"retrieval on {args.n} queries per modality")
    contrastive = rerun.trainer(Path(args.run), cl, device, log=out / "grsl-train.log")
    with tqdm(total=len(rungs) * ladder.work(args.probe_n, cl.steps), bar_format=BAR) as bar:
        results = [rung_result(args, cl, device, contrastive, step, folder, bar) for step, folder in rungs]
    rows, fits = ladder.points(results), ladder.fit(results, n_boot=args.boot)
    report = {"points": rows, "fit": fits, "run": args.run, "rungs": [f.name for _, f in rungs],
              "options": {"retrieval_queries": args.n, "probe_items": args.probe_n, "cl_steps": cl.steps,
                          "cl_lr": cl.lr, "seed": cl.seed, "precision": cl.precision, "quick": args.quick}}
    (out / "grsl.json").write_text(json.dumps(report, indent=1) + "\n")
    plots.grsl_figure(rows, fits, ladder.PAPER_POINTS, out / "grsl.png")
    print("\n" + ladder.table(rows, fits))
    print(f"\nwrote {out / 'grsl.json'} and {out / 'grsl.png'}")


# ----------------------------------------------------------------------------- continual: the SeaDoc analogue

def continual_base(args, run: Path, config: dict, steps: int, precision_used: str, bar) -> Path:
    """The run's base after the continual stage (train.py --continue-from, reading the alien script),
    kept in --out's cache: a rerun with the same base and options does not train it again."""
    import train  # the sibling script: the continual stage is its pretraining loop

    mix = continual.continual_mix(config.get("pretrain_mix"), args.continual_share)
    key = _cache_key("continual-base", str((run / "base").resolve()), geometry.stamp(run / "base"), mix, steps,
                     args.continual_lr, config["seed"], precision_used)
    folder = Path(args.out) / "cache" / f"continual-{key}"
    if (folder / "base").is_dir() and not _readable_model(folder / "base"):
        print(f"note: {folder / 'base'}: an unreadable cached model; training it again")
    if not _readable_model(folder / "base"):
        bar.set_description(f"continual pretraining: {steps} steps, {args.continual_share:.0%} reading the alien script")
        argv = continual.continual_argv(run / "base", folder, mix, steps, args.continual_lr, config["seed"],
                                        device=args.device, precision=precision_used)
        with open(Path(args.out) / "continual-train.log", "a") as log, contextlib.redirect_stdout(log):
            print(f"--- python train.py {' '.join(argv)}")
            try:
                train.main(argv + (["--overwrite"] if folder.exists() else []))  # a stage cut short starts again
            except (train.TrainingError, runs.RunError, checkpoint.CheckpointError, lock.LockError) as error:
                fail(f"continual pretraining: {error}")
    bar.update(steps)
    return folder / "base"


def _readable_model(folder: Path) -> bool:
    """A cached model folder that is whole: its config parses and every weight file's header fits
    the file (a copy cut short by a full disk or a kill does not)."""
    from safetensors import safe_open

    try:
        json.loads((folder / "config.json").read_text())
        weights = sorted(folder.glob("*.safetensors"))
        for file in weights:
            with safe_open(str(file), framework="pt") as opened:
                opened.keys()
        return bool(weights)
    except Exception:  # missing, unparsable, truncated: any of them means "train it again"
        return False


def continual_experiment(args) -> None:
    """(i) base -> CL against (ii) base -> continual pretraining on the alien script -> the same CL;
    continual.json/.png and the table."""
    run = Path(args.run)
    if _run_config(run).get("model", "tiny") != "tiny":  # before _experiment makes --out
        fail(f"{run} trained another model: the alien script belongs to the tiny model's world; "
             f"continual needs a `python train.py` run of the tiny model")
    config, cl, device, out = _experiment(args)
    steps = args.continual_steps or (100 if args.quick else 300)
    print(f"continual: (i) {run / 'base'} -> text-only CL, against (ii) the same base -> {steps} steps of continual "
          f"pretraining, {args.continual_share:.0%} of each batch reading the alien script (lr {args.continual_lr}) "
          f"-> the same CL ({cl.steps} steps, lr {cl.lr}, seed "
          f"{cl.seed}); reading probe on {args.probe_n} and retrieval on {args.n} held-out documents per script")
    contrastive = rerun.trainer(run, cl, device, log=out / "continual-train.log")
    with tqdm(total=steps + 2 * continual.work(args.probe_n, cl.steps), bar_format=BAR) as bar:
        bases = {"cl_only": run / "base", "continual_then_cl": continual_base(args, run, config, steps, cl.precision, bar)}
        arms = {}
        for name, folder in bases.items():
            cache = _measured(args, cl, f"continual-{name}", folder)
            arms[name] = _cached(cache, lambda: continual.measure_arm(
                folder, contrastive, device, args.probe_n, args.n, seed=cl.seed + 1234, cl_steps=cl.steps,
                batch_size=args.batch_size, max_text_tokens=cl.max_text_tokens, bar=bar),
                bar, continual.work(args.probe_n, cl.steps))
    report = {**continual.summary(arms, steps, n_boot=args.boot), "run": args.run,
              "options": {"continual_steps": steps, "continual_lr": args.continual_lr,
                          "continual_share": args.continual_share, "retrieval_queries": args.n,
                          "probe_items": args.probe_n, "cl_steps": cl.steps, "cl_lr": cl.lr, "seed": cl.seed,
                          "precision": cl.precision, "quick": args.quick}}
    (out / "continual.json").write_text(json.dumps(report, indent=1) + "\n")
    plots.continual_figure(report, out / "continual.png")
    print("\n" + continual.table(report))
    print(f"\nwrote {out / 'continual.json'} and {out / 'continual.png'}")


# ----------------------------------------------------------------------------- main

def main(argv=None) -> None:
    args = get_args(argv)
    check_out(Path(args.out))
    try:
        with lock.hold(args.out, f"analyze.py {args.command}"):  # one run per --out
            run(args)
    except lock.LockError as error:
        fail(str(error))
    except KeyboardInterrupt:
        print(f"interrupted: what was measured is kept in {Path(args.out) / 'cache'}; run the same command "
              f"again to continue", file=sys.stderr)
        sys.exit(130)


def check_out(out: Path) -> None:
    """--out must be a folder this run can write, checked before any work (try it: permission bits
    say nothing for root, or on a read-only file system)."""
    if out.exists() and not out.is_dir():
        fail(f"--out {out}: is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with open(out / ".write-test", "w"):
            pass
        (out / ".write-test").unlink()
    except OSError as error:
        fail(f"--out {out}: cannot write there ({error.strerror or error})")


def run(args) -> None:
    """The measurement `args.command` names, its JSON, plot and table."""
    if args.command == "grsl":
        return grsl(args)
    if args.command == "continual":
        return continual_experiment(args)
    models = model_list(args)
    try:
        groups = geometry.data_groups(args.data, args.n) if args.data else geometry.world_groups(args.n, args.split, args.seed)
        geometry.check_sizes(groups, args)
    except (data.DataError, geometry.GeometryError) as error:
        fail(str(error))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results, items = {}, {name: len(media) for name, (media, _) in groups.items()}
    for name, model in zip(labels(models), models):
        try:
            embeddings = geometry.embed_groups(args, model, groups)
        except geometry.GeometryError as error:  # a model that cannot be loaded
            fail(str(error))
        if args.command == "anisotropy":
            results[name] = geometry.anisotropy_of(embeddings, from_world=not args.data)
        else:
            results[name] = geometry.alignment_of(embeddings, args.k, args.null)
    if "image" in items and not args.data:
        items["text"] = items["image"]
    if args.data:
        items["positive"] = sum(items.values())
    source = {"data": args.data} if args.data else {"world": args.split, "seed": args.seed}
    report = {"models": results, "n": args.n, "items": items, "source": source, "model_paths": dict(zip(labels(models), models))}
    if args.command == "anisotropy":
        table = geometry.anisotropy_table(results, items)
        plots.anisotropy_figure(results, out / "anisotropy.png")
    else:
        report.update(k=args.k, null_shuffles=args.null)
        table = geometry.alignment_table(results, items, args.k, args.null)
        plots.alignment_figure(results, out / "alignment.png")
    (out / f"{args.command}.json").write_text(json.dumps(report, indent=1) + "\n")
    print("\n" + table)
    print(f"\nwrote {out / (args.command + '.json')} and {out / (args.command + '.png')}")


if __name__ == "__main__":
    main()
