"""Whether a training run may start: its options, its model and data, its output folder, and
what --resume continues. check_run does it all before train.py deletes or writes anything.

Three rules keep a user's work safe, all checked before anything is deleted or written:
  1. a run never deletes, replaces or writes into one of its inputs (the --model folder, the data
     files): `--out` may hold the model (out/base is how the tiny model's stages meet), never the
     other way round;
  2. an earlier run is replaced only with --overwrite, which deletes only what the stages of this
     run write (and never an input); --resume continues it instead, the two are exclusive;
  3. --resume continues only the same run: a checkpoint whose configuration differs in anything that
     shapes the result is refused, with the differing keys named, and a resume with nothing to
     resume is an error, not a silent fresh start.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
from pathlib import Path

import torch

from lco_mini import backbone
from lco_mini.experiments import evaluation
from lco_mini.support import checkpoint, data, distributed, precision
from lco_mini.support.distributed import say

# What each stage writes into --out (run_config.json, written by every run, is not a result).
# base-step*: the snapshots of the tiny pretraining (--snapshot-steps), the GRSL ladder of analyze.py.
STAGE_OUTPUTS = {"pretrain": ["base", "base-step*", "init", "pretrain.ckpt.pt"],
                 "contrastive": ["adapter", "merged", "control", "contrastive.ckpt.pt", "control.ckpt.pt", "eval.json"]}
RUN_CONFIG = "run_config.json"  # not config.json: that name belongs to model folders

# The options that shape what a stage computes; the rest (logging, --out, --device...) do not.
SHARED_KEYS = ("model", "seed", "tiny_size", "weight_decay", "grad_clip", "lora_r", "lora_alpha", "lora_dropout",
               "max_text_tokens", "precision")
RUN_KEYS = {
    "pretrain": SHARED_KEYS + ("pretrain_steps", "pretrain_batch", "pretrain_lr", "pretrain_warmup",
                               "pretrain_mix", "pretrain_data", "continue_from"),
    "contrastive": SHARED_KEYS + ("data", "steps", "batch_size", "micro_batch", "hard_negatives", "multimodal_ratio",
                                  "temperature", "lr", "warmup"),
}


class RunError(ValueError):
    """A run that must not start (it would lose work, or is not what the user asked for)."""


# ----------------------------------------------------------------------------- options

def device_problem(device: str | None) -> str | None:
    """What is wrong with a --device value (train.py and embed.py), or None when it can be used."""
    if device is None:
        return None
    try:
        chosen = torch.device(device)
    except RuntimeError:
        return f"{device!r} is not a device (cpu, cuda, cuda:1 ...)"
    if chosen.type == "cuda" and not torch.cuda.is_available():
        return f"{device}: no CUDA GPU is available here (use --device cpu)"
    if chosen.type == "cuda" and chosen.index is not None and chosen.index >= torch.cuda.device_count():
        return f"{device}: there are {torch.cuda.device_count()} GPUs here"
    return None


def check_device(p: argparse.ArgumentParser, device: str | None) -> None:
    problem = device_problem(device)
    if problem:
        p.error(f"argument --device: {problem}")


def settle_options(p: argparse.ArgumentParser, args) -> None:
    """train.py's options, checked together (one line and exit 2 for a combination that cannot run), and
    completed: --profile-steps sets the steps and turns off evaluation and snapshots, --snapshot-steps
    becomes a list of steps, --warmup defaults to 10% of the CL steps (at most 100)."""
    check_device(p, args.device)
    if args.precision not in precision.CHOICES:  # a bad LCO_MINI_PRECISION (argparse checks only what is typed)
        p.error(f"--precision must be one of {', '.join(precision.CHOICES)}; got {args.precision!r}")
    if args.stage == "pretrain" and args.model != "tiny" and not args.pretrain_data:
        p.error("--stage pretrain on a real backbone needs --pretrain-data (a jsonl: anchor -> positive text)")
    if args.model == "tiny" and args.pretrain_data:
        p.error("--pretrain-data is for a real backbone (--model); the tiny model pretrains on its world")
    if args.continue_from and args.model != "tiny":
        p.error("--continue-from is for the tiny model; a real backbone's continual pretraining starts from --model")
    if args.profile_steps:
        if args.resume:
            p.error("--profile-steps runs in a scratch folder: it cannot --resume")
        if args.model == "tiny" and args.stage == "contrastive":
            p.error("--profile-steps on the tiny model profiles --stage all or pretrain (contrastive needs its base)")
        if int(os.environ.get("WORLD_SIZE", 1)) > 1:
            p.error("--profile-steps runs in one process (not under torchrun)")
        args.pretrain_steps = args.steps = args.profile_steps
        args.no_eval = args.no_control = True
        args.snapshot_steps = ""
    args.snapshot_steps = snapshot_steps(p, args)
    if args.warmup is None:
        args.warmup = min(100, max(1, args.steps // 10))


def snapshot_steps(p: argparse.ArgumentParser, args) -> list[int]:
    """--snapshot-steps as a sorted list of steps, each inside the tiny pretraining."""
    if args.snapshot_steps and args.model != "tiny":
        p.error("--snapshot-steps is for the tiny model's pretraining (a real backbone's LoRA is merged once, at the end)")
    if args.snapshot_steps == "auto":
        return sorted({round(args.pretrain_steps * f) for f in (1 / 8, 1 / 4, 1 / 2, 3 / 4)} - {0, args.pretrain_steps})
    try:
        steps = sorted({int(n) for n in args.snapshot_steps.split(",") if n.strip()})
    except ValueError:
        p.error(f"--snapshot-steps: expected steps like 65,130,260 (or auto, or ''); got {args.snapshot_steps!r}")
    if steps and not 1 <= steps[0] <= steps[-1] < args.pretrain_steps:
        p.error(f"--snapshot-steps must lie between 1 and --pretrain-steps - 1 = {args.pretrain_steps - 1}; "
                f"got {','.join(map(str, steps))} (the last step is base/ itself)")
    return steps


# ----------------------------------------------------------------------------- the output folder


def stages_run(args) -> list[str]:
    """The stages this run trains: pretraining only for the tiny model or with --pretrain-data."""
    pretrains = args.stage != "contrastive" and (args.model == "tiny" or bool(args.pretrain_data))
    return (["pretrain"] if pretrains else []) + (["contrastive"] if args.stage != "pretrain" else [])


def inputs_of(args, out: Path) -> dict[Path, str]:
    """path -> what it is, for everything this run reads from disk."""
    inputs = {}
    if args.model != "tiny" and Path(args.model).expanduser().exists():
        inputs[Path(args.model).expanduser()] = "the --model folder"
    elif args.model == "tiny" and "pretrain" not in stages_run(args):
        inputs[out / "base"] = "the pretrained base model"
    if args.continue_from and "pretrain" in stages_run(args):
        inputs[Path(args.continue_from).expanduser()] = "the --continue-from model"
    for flag, path in (("--data", args.data), ("--pretrain-data", args.pretrain_data), ("--eval-data", args.eval_data)):
        if path:
            inputs[Path(path).expanduser()] = f"the {flag} file"
    return inputs


def _contains(folder: Path, path: Path) -> bool:
    folder, path = folder.resolve(), path.resolve()
    return path == folder or folder in path.parents


def snapshot_folder(out: Path, step: int) -> Path:
    """Where the tiny pretraining leaves its model after `step` steps (the last one is out/base)."""
    return out / f"base-step{step}"


def written_by(args, out: Path) -> list[Path]:
    """Every path in --out this run may create or replace."""
    snapshots = [snapshot_folder(out, step) for step in args.snapshot_steps] if "pretrain" in stages_run(args) else []
    return [out / RUN_CONFIG] + snapshots + [out / name for stage in stages_run(args)
                                             for name in STAGE_OUTPUTS[stage] if "*" not in name]


def existing_outputs(args, out: Path) -> list[Path]:
    """What the stages of this run would replace that is already in --out (snapshots of any step)."""
    return [path for stage in stages_run(args) for name in STAGE_OUTPUTS[stage] for path in sorted(out.glob(name))]


def check_output_folder(args, out: Path) -> list[Path]:
    """Refuse a run that would lose work; returns what --overwrite will delete (nothing is deleted here)."""
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out}: is a file, not a folder")
    inputs = inputs_of(args, out)
    existing = existing_outputs(args, out)  # what --overwrite would delete (every base-step*, say)
    for path in written_by(args, out) + existing:
        for source, what in inputs.items():
            if _contains(path, source) or (source.is_dir() and _contains(source, path)):
                raise RunError(f"--out {out}: this run would write or replace {path}, which is or is inside {what} "
                               f"{source}; choose another --out")
    if existing and not (args.resume or args.overwrite):
        raise RunError(f"{out}/ already holds a run ({', '.join(p.name for p in existing)}): pass --resume to "
                       f"continue it, --overwrite to replace it, or --out to write elsewhere")
    return existing if args.overwrite else []


def delete(paths: list[Path]) -> None:
    """The earlier run's outputs, once everything has been checked."""
    for path in paths:
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def checkpoints_of(args, out: Path) -> list[tuple[str, str, Path]]:
    """(loop name, stage whose options shape it, checkpoint path) for each training loop of this run."""
    loops = [(stage, stage) for stage in stages_run(args)]
    if "contrastive" in stages_run(args) and args.model == "tiny" and not (args.no_eval or args.no_control):
        loops.append(("control", "contrastive"))
    return [(name, stage, out / f"{name}.ckpt.pt") for name, stage in loops]


def resume_plan(args, out: Path) -> str:
    """What --resume continues, one line; RunError when there is nothing to resume or the run
    in --out was made with different options; CheckpointError for an unreadable checkpoint."""
    if not out.is_dir():
        raise RunError(f"--resume: {out} does not exist, so there is nothing to resume (is --out right?)")
    parts, found = [], False
    for name, stage, path in checkpoints_of(args, out):
        state = checkpoint.load(path)
        if state is not None:
            changes = checkpoint.config_changes(state["config"], vars(args), RUN_KEYS[stage])
            if changes:
                raise RunError(f"--resume: {path} was written with other options ({'; '.join(changes)}); "
                               f"pass the same options, or --overwrite to start again")
        total = args.pretrain_steps if stage == "pretrain" else args.steps
        if name == "pretrain" and (out / "base").is_dir():
            parts.append(f"pretrain is complete ({out / 'base'})")
        elif state is not None:
            parts.append(f"{name} continues at step {state['step']} of {total}")
        else:
            parts.append(f"{name} starts at step 0")
        found |= state is not None or (name == "pretrain" and (out / "base").is_dir())
    if not found:
        raise RunError(f"--resume: nothing to resume in {out} (no checkpoint of this run's stages); "
                       f"run without --resume to start")
    return "resume: " + "; ".join(parts)


# ----------------------------------------------------------------------------- before the first step

def check_run(args, out: Path) -> tuple[list, list | None, list | None, list | None]:
    """Everything that can fail before the first step, checked before anything is deleted:
    the model source, the data (every line and file), the output folder, what --resume continues.
    Returns (what --overwrite deletes, contrastive, pretraining and evaluation pairs)."""
    stages, source = stages_run(args), None
    if args.model != "tiny":
        try:
            source = backbone.load_config(args.model)[0]
        except (OSError, ValueError) as e:  # no such folder, no config.json, the hub unreachable, not multimodal
            raise RunError(" ".join(str(e).split())) from None
    elif "pretrain" not in stages and not (out / "base").is_dir():
        raise RunError(f"{out / 'base'} does not exist: run `python train.py --stage pretrain` first")
    if args.continue_from and "pretrain" in stages:
        check_continue_from(Path(args.continue_from))
    pairs = read_pairs(args.data, args, "contrastive") if args.data and "contrastive" in stages else None
    pretrain_pairs = None
    if args.pretrain_data and "pretrain" in stages and args.model != "tiny":
        pretrain_pairs = read_pairs(args.pretrain_data, args, "pretrain")
    eval_pairs = read_pairs(args.eval_data, args, "evaluation") if args.eval_data and not args.no_eval else None
    with_media = [(dataset, path) for dataset, path in ((pairs, args.data), (pretrain_pairs, args.pretrain_data),
                                                         (eval_pairs, args.eval_data))
                  if dataset and not all(data.is_text_only(p) for p in dataset)]
    if source is not None and with_media:  # the tiny model is an omni model: it takes every kind
        processor = backbone.load_processor(source)  # once, for every dataset
        for dataset, path in with_media:
            data.check_processor_takes(dataset, processor, path)
    if pretrain_pairs is not None:
        check_pretrain_steps(args, pretrain_pairs)
    if pairs is not None and len(pairs) < args.batch_size:
        say(f"warning: {args.data} has {len(pairs)} pairs, fewer than one batch of {args.batch_size}: "
            f"a batch repeats pairs, and a repeated pair is its own false negative")
    if pairs is not None and args.multimodal_ratio:
        text, multimodal = data.split_by_modality(pairs)
        n_media = round(args.multimodal_ratio * args.batch_size)
        if (n_media and not multimodal) or (args.batch_size - n_media and not text):
            raise RunError(f"--multimodal-ratio {args.multimodal_ratio} draws {n_media} multimodal and "
                                f"{args.batch_size - n_media} text pairs per batch, but {args.data} has "
                                f"{len(multimodal)} multimodal and {len(text)} text-only pairs")
    if eval_pairs is not None:
        try:
            evaluation.check_pairs(eval_pairs, args.hard_negatives, args.eval_data)
        except ValueError as e:
            raise RunError(str(e)) from None
    for flag, stage in (("batch_size", "contrastive"), ("pretrain_batch", "pretrain")):
        if stage in stages and getattr(args, flag) % distributed.world_size():
            raise RunError(f"--{flag.replace('_', '-')} {getattr(args, flag)} must be divisible by the "
                                f"{distributed.world_size()} processes (each takes an equal share of the batch)")
    replaced = check_output_folder(args, out)
    if args.resume:
        say(resume_plan(args, out))
    return replaced, pairs, pretrain_pairs, eval_pairs


def check_continue_from(folder: Path) -> None:
    """--continue-from pretrains a tiny model further on the world, whose sounds only an omni model
    hears: a VL or text-only model, or no model at all, is refused before anything is written."""
    hint = "pass a tiny model train.py wrote, such as out/base"
    try:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    except FileNotFoundError:
        raise RunError(f"--continue-from {folder}: not a model folder (no config.json); {hint}") from None
    except (OSError, ValueError, AttributeError) as e:
        raise RunError(f"--continue-from {folder}: its config.json cannot be read ({e}); {hint}") from None
    if model_type not in ("qwen2_5_omni_thinker", "qwen2_5_omni"):
        raise RunError(f"--continue-from {folder}: a {model_type!r} model; continual pretraining on the "
                       f"world needs a Qwen2.5-Omni thinker (its sounds need the audio tower): {hint}")


def check_pretrain_steps(args, pairs: list) -> None:
    """Continual pretraining of a real backbone: one epoch of --pretrain-data unless told otherwise."""
    if args.pretrain_steps is None:
        epoch = math.ceil(len(pairs) / args.pretrain_batch)
        args.pretrain_steps = epoch
        say(f"pretrain: {epoch} steps = one epoch of {len(pairs)} examples at --pretrain-batch {args.pretrain_batch}")


def read_pairs(path: str, args, name: str) -> list:
    """A jsonl dataset, every line and file checked now (before any output is touched)."""
    pairs, bad = data.read_jsonl(path, skip_bad=args.skip_bad)
    say(f"{name}: {len(pairs)} pairs from {path}" + (f", {bad} bad lines skipped" if bad else ""))
    if name == "contrastive" and args.hard_negatives and any(p.negative is None for p in pairs):
        raise RunError(f"{path}: some lines have no 'negative'; pass --no-hard-negatives to train without")
    for pair in pairs if name == "pretrain" else []:  # the positive is the text to generate
        if set(pair.positive) != {"text"}:
            raise RunError(f"{path}: line {pair.line}: the positive of a pretraining pair must be text only "
                                f"(it is what the model learns to generate)")
    return pairs
