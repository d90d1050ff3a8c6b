"""Train an omnimodal embedding model the LCO-Emb way: generative pretraining, then
language-centric (text-only) contrastive learning with LoRA.

    python train.py                                   # tiny default: both stages + evaluation (~5 min on 2 CPU cores)
    python train.py --stage pretrain                  # only the generative stage (tiny: pretraining from scratch)
    python train.py --stage contrastive               # only contrastive learning, on out/base
    python train.py --resume                          # continue an interrupted run from its last checkpoint
    python train.py --stage pretrain --continue-from out/base --pretrain-mix alien=1 --pretrain-steps 300 \\
        --out out_alien                               # tiny continual pretraining: half of each batch the alien script
    python train.py --model Qwen/Qwen2.5-VL-3B-Instruct --stage contrastive --data pairs.jsonl \\
        --batch-size 1056 --micro-batch 32 --lr 4e-4 --steps 2000
    torchrun --nproc_per_node 8 train.py --model Qwen/Qwen2.5-Omni-3B --stage contrastive --data pairs.jsonl

What happens, top to bottom:
  1. pretrain     next-token training. For the tiny default, from scratch: describing the synthetic
                  world's images, videos and sounds, reading its documents, rephrasing its
                  captions (generic instructions, never the embedding prompt). For a real backbone:
                  continual generative pretraining with LoRA on --pretrain-data
                  (input = anchor side, target = positive text).
  2. contrastive  InfoNCE (tau = 0.03) on TEXT pairs only (paraphrase positive + hard negative),
                  LoRA on the language model. Image, audio and video are never seen here.
  3. evaluate     held-out retrieval for (a) the base model, (b) after contrastive learning and,
                  for the tiny default, (c) a control: the same contrastive learning on a model
                  that never had generative pretraining.
Outputs in --out: base/ (pretrained model), base-step{N}/ (the tiny model part-way through its
pretraining: the ladder of `python analyze.py grsl`), adapter/ (peft-compatible LoRA files),
merged/ (what `python embed.py` uses by default), control/ (the control's merged model), eval.json,
run_config.json (the options), *.ckpt.pt. Nothing is deleted or written before every option, the
data and the output folder have been checked; inputs are never deleted (see lco_mini/support/runs.py).
"""
from __future__ import annotations

from lco_mini.support import cli as command_line

command_line.spin_briefly()  # how idle OpenMP threads wait is read when torch loads: set it first

import argparse  # noqa: E402 (after the OpenMP setting)
import contextlib  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from lco_mini import backbone  # noqa: E402
from lco_mini.embedder import Embedder  # noqa: E402
from lco_mini.experiments import evaluation  # noqa: E402
from lco_mini.loop import TrainingError  # noqa: E402
from lco_mini.stages import build_tiny_init, run_contrastive, run_pretrain, save_contrastive  # noqa: E402
from lco_mini.support import checkpoint, data, distributed, lock, media, precision, runs  # noqa: E402
from lco_mini.support.cli import number  # noqa: E402
from lco_mini.support.distributed import say  # noqa: E402
from lco_mini.tiny import model as tiny  # noqa: E402
from lco_mini.tiny.tasks import PRETRAIN_MIX, parse_mix  # noqa: E402


# ----------------------------------------------------------------------------- the two recipes
# The defaults that differ between the tiny model (built here and pretrained from scratch, on a CPU)
# and a real backbone (a pretrained Qwen MLLM, on a GPU). `--help` shows the recipe of the --model
# given. What was measured to choose the tiny values is in docs/experiments.md.
TINY_RECIPE = dict(
    pretrain_steps=520,   # from scratch: long enough for the towers to describe the world's media
    pretrain_lr=4e-4,     # a rate five times higher (2e-3) collapses the tiny vision tower
    steps=45,             # contrastive steps: enough for the paper's effect on three seeds
    lr=1e-3,              # contrastive peak lr of the tiny model (the paper's 4e-4 is for 3B-7B models)
    lora_r=16, lora_alpha=32,  # alpha / r = 2, as in the paper
    lora_dropout=0.0,     # drawing dropout masks took ~40% of a CPU contrastive step; 45 steps do not overfit
    snapshot_steps="auto",  # base-step{N}/ at 1/8, 1/4, 1/2, 3/4 of pretraining: the ladder of `analyze.py grsl`
)
REAL_RECIPE = dict(
    pretrain_steps=None,  # continual pretraining: one epoch of --pretrain-data (counted once it is read)
    pretrain_lr=1e-4,     # continual pretraining with LoRA: lower than from scratch
    steps=1000,           # contrastive steps at the paper's batch size
    lr=4e-4,              # the paper's contrastive lr
    lora_r=64, lora_alpha=128, lora_dropout=0.05,  # the paper's LoRA
    snapshot_steps="",    # a real backbone's continual pretraining leaves only its merged base/
)


def recipe(argv) -> dict:
    """The recipe of the --model in argv (read before the full parse, so --help can show it)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--model", default="tiny")
    return TINY_RECIPE if pre.parse_known_args(argv)[0].model == "tiny" else REAL_RECIPE


def get_args(argv=None) -> argparse.Namespace:
    p = command_line.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=["pretrain", "contrastive", "all"], default="all",
                   help="which stage(s) to run (default: all = pretrain, contrastive, evaluate)")
    p.add_argument("--model", default="tiny",
                   help="'tiny' (the built-in default, built and pretrained here) or a hub id / folder")
    p.add_argument("--data", default=None, help="contrastive pairs jsonl (official format); default: the world's text pairs")
    p.add_argument("--eval-data", default=None,
                   help="your own held-out pairs (jsonl): also evaluate anchor -> positive retrieval on them")
    p.add_argument("--out", default="out", help="output folder (default: out)")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    again.add_argument("--overwrite", action="store_true",
                       help="replace an earlier run in --out (only what this run's stages write; never an input)")
    p.add_argument("--seed", type=number(low=0, high=2**32 - 1025), default=0,
                   help="seed for model init, data order and dropout")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--precision", choices=precision.CHOICES, default=precision.DEFAULT,
                   help="auto (default; env LCO_MINI_PRECISION): bf16 on CUDA and on CPUs with native bf16 "
                        "(AVX512-BF16, AMX), else fp32; trained weights and AdamW state stay fp32. fp32: no autocast, "
                        "exact on a CPU (on CUDA frozen bases load in bf16; lco_mini/support/precision.py)")

    cl = p.add_argument_group("contrastive learning (stage 2)")
    cl.add_argument("--steps", type=number(low=1), help="contrastive steps (default: %(default)s)")
    cl.add_argument("--batch-size", type=number(low=1), default=32, help="pairs per step, across all processes (the paper: 1056)")
    cl.add_argument("--micro-batch", type=number(low=0), default=0,
                    help="items per forward pass with GradCache; 0 = the whole batch at once. "
                         "Unlike gradient accumulation this keeps every in-batch negative")
    cl.add_argument("--lr", type=number(float, above=0), help="contrastive peak lr (default: %(default)s; paper: 4e-4)")
    cl.add_argument("--warmup", type=number(low=0), default=None, help="warm-up steps (default: 10%% of steps, at most 100)")
    cl.add_argument("--temperature", type=number(float, above=0), default=0.03, help="InfoNCE temperature (paper: 0.03)")
    cl.add_argument("--no-hard-negatives", dest="hard_negatives", action="store_false",
                    help="train without the hard negative of each pair (in-batch negatives only)")
    cl.add_argument("--multimodal-ratio", type=number(float, low=0, high=1), default=0.0,
                    help="fraction of pairs replaced by multimodal calibration pairs (media -> caption); paper: ~0.2")
    cl.add_argument("--lora-r", type=number(low=1), help="LoRA rank (default: %(default)s)")
    cl.add_argument("--lora-alpha", type=number(float, above=0), help="LoRA alpha (default: %(default)s)")
    cl.add_argument("--lora-dropout", type=number(float, low=0, below=1), help="LoRA dropout (default: %(default)s)")
    cl.add_argument("--weight-decay", type=number(float, low=0), default=0.0, help="AdamW weight decay")
    cl.add_argument("--grad-clip", type=number(float, low=0), default=1.0, help="clip the global gradient norm (0 = off)")
    cl.add_argument("--max-text-tokens", type=number(low=1), default=media.MAX_TEXT_TOKENS,
                    help="cut every text to this many tokens, in training and evaluation (as embed.py does; "
                         "the official code: 650); the tiny world's texts are far shorter. A batch pads to its "
                         "longest text, so one long text makes a step cost batch x 3 items x this many tokens "
                         "(attention: its square); lower it, or --micro-batch, to bound a step's memory")
    cl.add_argument("--skip-bad", action="store_true", help="skip (and count) bad jsonl lines instead of stopping")

    gen = p.add_argument_group("generative pretraining (stage 1)")
    gen.add_argument("--pretrain-data", default=None, help="jsonl for continual generative pretraining of a real backbone")
    gen.add_argument("--pretrain-steps", type=number(low=1),
                     help="generative steps (default: %(default)s; None = one epoch of --pretrain-data)")
    gen.add_argument("--pretrain-batch", type=number(low=1), default=32, help="sequences per generative step")
    gen.add_argument("--pretrain-lr", type=number(float, above=0), help="generative peak lr (default: %(default)s)")
    gen.add_argument("--pretrain-warmup", type=number(low=0), default=3, help="generative warm-up steps")

    log = p.add_argument_group("evaluation, logging, checkpoints")
    log.add_argument("--eval-n", type=number(low=1), default=300,
                     help="held-out queries per retrieval task (300: a standard error of ~2 points at R@1 = 10%%)")
    log.add_argument("--no-eval", action="store_true", help="skip the final evaluation")
    log.add_argument("--log-every", type=number(low=1), default=25, help="print a log line every N steps")
    log.add_argument("--ckpt-every", type=number(low=1), default=50, help="write a checkpoint every N steps")

    lab = p.add_argument_group("experiments (the tiny model; analyze.py and the tests use these)")
    lab.add_argument("--no-control", action="store_true", help="skip the random-init control run (tiny only)")
    lab.add_argument("--pretrain-mix", type=parse_mix, default=dict(PRETRAIN_MIX), metavar="M=SHARE,...",
                     help="tiny pretraining: the share of each modality, e.g. audio=0.35,text=0.25; unlisted "
                          "modalities keep their default share, then all are rescaled to sum to 1 "
                          f"(default: {','.join(f'{m}={v}' for m, v in PRETRAIN_MIX.items())})")
    lab.add_argument("--continue-from", metavar="DIR",
                     help="tiny: pretrain this tiny model further instead of a random init (continual pretraining; "
                          "e.g. --pretrain-mix alien=1 reads the invented script, as analyze.py continual does)")
    lab.add_argument("--snapshot-steps", metavar="N,N,...",
                     help="tiny pretraining: also save the model after these steps, as base-step{N}/ "
                          "(23 MB each at the default size; the ladder of `analyze.py grsl`). "
                          "auto = 1/8, 1/4, 1/2, 3/4 of --pretrain-steps; '' = none (default: %(default)s)")
    lab.add_argument("--profile-steps", type=number(low=2), default=0, metavar="N",
                     help="only time N steps of each stage, in a scratch folder deleted after (--out is not "
                          "touched), and print where a step's time goes: data, processor, forward, backward "
                          "(or gradcache, with --micro-batch), optimizer")
    lab.add_argument("--tiny-size", default="default", choices=sorted(tiny.SIZES),
                     help="size preset of the tiny model (smoke = for tests)")
    p.set_defaults(**recipe(argv))
    args = p.parse_args(argv)
    runs.settle_options(p, args)  # what argparse cannot check alone, and what --profile-steps implies
    return args


def evaluate_models(args, device, out: Path, runs: dict, eval_pairs: list | None) -> None:
    """Held-out retrieval for each (name -> (model, processor)), on the world and on --eval-data;
    table printed, JSON saved."""
    results = {}
    for name, (model, processor) in runs.items():
        say(f"evaluating {name} ...")
        embedder = Embedder(model, processor, batch_size=32, device=device, progress=False,
                                     max_text_tokens=args.max_text_tokens)
        results[name] = evaluation.evaluate(embedder, n=args.eval_n, seed=args.seed + 1234)
        if eval_pairs is not None:
            results[name].update(evaluation.evaluate_pairs(embedder, eval_pairs, bool(args.hard_negatives)))
    evaluation.save(results, out / "eval.json")
    say("\nheld-out retrieval (%):\n" + evaluation.format_table(results) + f"\nsaved to {out / 'eval.json'}")


# ----------------------------------------------------------------------------- main

def main(argv=None) -> None:
    args = get_args(argv)
    transformers.utils.logging.disable_progress_bar()  # our own log lines say what is happening
    transformers.utils.logging.set_verbosity_error()
    device, rank, world_size = distributed.setup(args.device)
    args.precision, why = precision.choose(args.precision, device)  # resolved before run_config.json records it
    torch.manual_seed(args.seed + rank)
    random.seed(args.seed)
    np.random.seed(args.seed)
    out = Path(tempfile.mkdtemp(prefix="lco_mini_profile_") if args.profile_steps else args.out)
    setup = (f"device: {device} | processes: {world_size} | torch {torch.__version__} | "
             f"threads {torch.get_num_threads()} | precision {args.precision} ({why})")
    main_process = distributed.is_main()
    try:
        if main_process:
            lock.check_free(out)  # a busy --out is refused first, naming the run that holds it
        checked = runs.check_run(args, out)  # everything that can fail, before anything is written
        with lock.hold(out, "train.py") if main_process else contextlib.nullcontext():  # one run per --out
            run_stages(args, device, out, setup, checked)
    except KeyboardInterrupt:
        command_line.interrupted("train.py", argv, out, resumable=not args.profile_steps)
    finally:
        if args.profile_steps:
            shutil.rmtree(out, ignore_errors=True)
    distributed.cleanup()


def run_stages(args, device, out: Path, setup: str, checked: tuple) -> None:
    """Pretrain, contrastive learning, control and evaluation, as asked, once runs.check_run has
    `checked` everything (what --overwrite replaces, the contrastive, pretraining and eval pairs)."""
    replaced, pairs, pretrain_pairs, eval_pairs = checked
    if replaced and distributed.is_main():
        say(f"--overwrite: replacing {', '.join(p.name for p in replaced)} in {out}")
        runs.delete(replaced)
    distributed.barrier()
    out.mkdir(parents=True, exist_ok=True)
    if distributed.is_main():
        (out / runs.RUN_CONFIG).write_text(json.dumps(vars(args), indent=2) + "\n")
    say(setup)
    t0 = time.time()

    base = Path(args.model)
    if "pretrain" in runs.stages_run(args):
        base = run_pretrain(args, device, out, pretrain_pairs)
    else:
        base = out / "base" if args.model == "tiny" else base  # check_run made sure it exists
        # CL alone on this run's base starts from the random state its pretraining ended in, as the
        # whole run's CL did: the same LoRA initialisation, so the same (b)
        if checkpoint.restore_rng(out / "pretrain.ckpt.pt", args.seed):
            say(f"contrastive: random state from {out / 'pretrain.ckpt.pt'}, where this run's pretraining ended")
    if args.stage == "pretrain":
        if not args.profile_steps:
            say(f"done in {time.time() - t0:.0f} s; pretrained model in {base}")
        return

    if args.profile_steps:  # the contrastive steps are timed too; nothing is saved
        run_contrastive(args, device, base, out, pairs)
        return
    # (b): text-only contrastive learning on the pretrained base
    merged = save_contrastive(*run_contrastive(args, device, base, out, pairs), base, out, "contrastive")
    runs_to_evaluate = {}
    if not args.no_eval:
        runs_to_evaluate["(a) base"] = backbone.load(base, device=device, precision_used=args.precision)
        runs_to_evaluate["(b) text-only CL"] = merged
        if args.model == "tiny" and not args.no_control:
            # (c) the control: the same contrastive learning on the same tiny model before any pretraining
            init = build_tiny_init(args, out)
            control = save_contrastive(*run_contrastive(args, device, init, out, pairs, name="control"),
                                       init, out, "control")
            runs_to_evaluate["(c) control: CL, no pretrain"] = control
        if distributed.is_main():  # every process holds the same merged weights: one evaluates
            evaluate_models(args, device, out, runs_to_evaluate, eval_pairs)
    say(f"\ndone in {time.time() - t0:.0f} s ({(time.time() - t0) / 60:.1f} min). "
        f"Embed with: python embed.py --model {out / 'merged'} FILE")


def cli(argv=None) -> None:
    """main(), with a user mistake as one line on stderr and exit code 2 instead of a traceback."""
    try:
        main(argv)
    except (TrainingError, data.DataError, runs.RunError, checkpoint.CheckpointError, lock.LockError) as err:
        command_line.fail(str(err))


if __name__ == "__main__":
    cli()
