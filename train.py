"""Train an omnimodal embedding model the LCO-Emb way: generative pretraining, then
language-centric (text-only) contrastive learning with LoRA.

    python train.py                                   # tiny default, both stages + evaluation (4.2-5.1 min: 2-core EPYC, bf16)
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
data and the output folder have been checked; inputs are never deleted (see lco_mini/runs.py).
"""
from __future__ import annotations

import os

# An idle OpenMP thread spins briefly (3,000 turns, microseconds) before it sleeps. Most ops here
# are small, so the second thread is woken thousands of times a step: waking a sleeping thread
# (OMP_WAIT_POLICY=PASSIVE) made a pretraining step 34% slower (410 against 305 ms), while spinning
# for long (libgomp's default, 300,000 turns) made two runs sharing a 2-core CPU twice as slow.
# docs/experiments.md has the table; running several jobs at once, set OMP_WAIT_POLICY=PASSIVE.
if "OMP_WAIT_POLICY" not in os.environ:  # a wait policy the user chose wins (libgomp would spin anyway)
    os.environ.setdefault("GOMP_SPINCOUNT", "3000")

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import transformers

from lco_mini import backbone, checkpoint, data, distributed, evaluation, lora, media, precision, runs, tiny
from lco_mini.losses import batch_items, batch_loss, embed_inputs, generative_inputs, generative_loss, gradcache
from lco_mini.distributed import say
from lco_mini.loop import Run, TrainingError
from lco_mini.tasks import MEDIA_KEY, PRETRAIN_MIX, WORLD_MEDIA, parse_mix, world_caption_examples, world_pair_examples


# ----------------------------------------------------------------------------- the two recipes
# The defaults that differ between the tiny model (built here and pretrained from scratch, on a CPU)
# and a real backbone (a pretrained Qwen MLLM, on a GPU). `--help` shows the recipe of the --model
# given. What was measured to choose the tiny values is in docs/experiments.md.
TINY_RECIPE = dict(
    pretrain_steps=520,   # from scratch: long enough for the towers to describe the world's media
    pretrain_lr=4e-4,     # a rate five times higher (2e-3) collapses the tiny vision tower
    steps=45,             # contrastive steps: enough for the paper's effect on three seeds (30 were too few)
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
    p = runs.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=["pretrain", "contrastive", "all"], default="all",
                   help="which stage(s) to run (default: all = pretrain, contrastive, evaluate)")
    p.add_argument("--model", default="tiny",
                   help="'tiny' (the built-in default, built and pretrained here) or a hub id / folder")
    p.add_argument("--out", default="out", help="output folder (default: out)")
    p.add_argument("--seed", type=runs.number(low=0, high=2**32 - 1025), default=0,
                   help="seed for model init, data order and dropout")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--precision", choices=precision.CHOICES, default=precision.DEFAULT,
                   help="auto (default; env LCO_MINI_PRECISION): bf16 on CUDA and on CPUs with native bf16 "
                        "(AVX512-BF16, AMX), else fp32; trained weights and AdamW state stay fp32. fp32: no autocast, "
                        "exact on a CPU (on CUDA frozen bases load in bf16; lco_mini/precision.py)")
    # generative stage
    p.add_argument("--pretrain-steps", type=runs.number(low=1),
                   help="generative steps (default: %(default)s; None = one epoch of --pretrain-data)")
    p.add_argument("--pretrain-batch", type=runs.number(low=1), default=32, help="sequences per generative step")
    p.add_argument("--pretrain-lr", type=runs.number(float, above=0), help="generative peak lr (default: %(default)s)")
    p.add_argument("--pretrain-warmup", type=runs.number(low=0), default=3, help="generative warm-up steps")
    p.add_argument("--pretrain-task", choices=["describe", "summary"], default="describe",
                   help="tiny pretraining tasks: generic describe/rephrase instructions, or the embedding prompt itself")
    p.add_argument("--pretrain-mix", type=parse_mix, default=dict(PRETRAIN_MIX), metavar="M=SHARE,...",
                   help="tiny pretraining: the share of each modality, e.g. audio=0.35,text=0.25; unlisted "
                        "modalities keep their default share, then all are rescaled to sum to 1 "
                        f"(default: {','.join(f'{m}={v}' for m, v in PRETRAIN_MIX.items())})")
    p.add_argument("--pretrain-qa", type=runs.number(float, low=0, high=1), default=0.0,
                   help="tiny pretraining: share of image/video/audio examples that are one-attribute questions")
    p.add_argument("--pretrain-data", default=None, help="jsonl for continual generative pretraining of a real backbone")
    p.add_argument("--continue-from", metavar="DIR",
                   help="tiny: pretrain this tiny model further instead of a random init (continual pretraining; "
                        "e.g. --pretrain-mix alien=1 reads the invented script, as analyze.py continual does)")
    p.add_argument("--snapshot-steps", metavar="N,N,...",
                   help="tiny pretraining: also save the model after these steps, as base-step{N}/ "
                        "(23 MB each at the default size; the ladder of `analyze.py grsl`). "
                        "auto = 1/8, 1/4, 1/2, 3/4 of --pretrain-steps; '' = none (default: %(default)s)")
    # contrastive stage
    p.add_argument("--data", default=None, help="contrastive pairs jsonl (official format); default: the world's text pairs")
    p.add_argument("--steps", type=runs.number(low=1), help="contrastive steps (default: %(default)s)")
    p.add_argument("--batch-size", type=runs.number(low=1), default=32, help="pairs per step, across all processes (the paper: 1056)")
    p.add_argument("--micro-batch", type=runs.number(low=0), default=0,
                   help="items per forward pass with GradCache; 0 = the whole batch at once. "
                        "Unlike gradient accumulation this keeps every in-batch negative")
    p.add_argument("--no-hard-negatives", dest="hard_negatives", action="store_false",
                   help="train without the hard negative of each pair (in-batch negatives only)")
    p.add_argument("--multimodal-ratio", type=runs.number(float, low=0, high=1), default=0.0,
                   help="fraction of pairs replaced by multimodal calibration pairs (media -> caption); paper: ~0.2")
    p.add_argument("--temperature", type=runs.number(float, above=0), default=0.03, help="InfoNCE temperature (paper: 0.03)")
    p.add_argument("--lr", type=runs.number(float, above=0), help="contrastive peak lr (default: %(default)s; paper: 4e-4)")
    p.add_argument("--warmup", type=runs.number(low=0), default=None, help="warm-up steps (default: 10%% of steps, at most 100)")
    p.add_argument("--weight-decay", type=runs.number(float, low=0), default=0.0, help="AdamW weight decay")
    p.add_argument("--grad-clip", type=runs.number(float, low=0), default=1.0, help="clip the global gradient norm (0 = off)")
    p.add_argument("--lora-r", type=runs.number(low=1), help="LoRA rank (default: %(default)s)")
    p.add_argument("--lora-alpha", type=runs.number(float, above=0), help="LoRA alpha (default: %(default)s)")
    p.add_argument("--lora-dropout", type=runs.number(float, low=0, below=1), help="LoRA dropout (default: %(default)s)")
    p.add_argument("--skip-bad", action="store_true", help="skip (and count) bad jsonl lines instead of stopping")
    # evaluation, logging, checkpoints
    p.add_argument("--eval-n", type=runs.number(low=1), default=300, help="held-out queries per retrieval task (300: a standard error of ~2 points at R@1 = 10%%)")
    p.add_argument("--no-eval", action="store_true", help="skip the final evaluation")
    p.add_argument("--eval-data", default=None,
                   help="your own held-out pairs (jsonl): also evaluate anchor -> positive retrieval on them")
    p.add_argument("--no-control", action="store_true", help="skip the random-init control run (tiny only)")
    p.add_argument("--log-every", type=runs.number(low=1), default=25, help="print a log line every N steps")
    p.add_argument("--profile-steps", type=runs.number(low=2), default=0, metavar="N",
                   help="only time N steps of each stage, in a scratch folder deleted after (--out is not "
                        "touched), and print where a step's time goes: data, processor, forward, backward "
                        "(or gradcache, with --micro-batch), optimizer")
    p.add_argument("--ckpt-every", type=runs.number(low=1), default=50, help="write a checkpoint every N steps")
    p.add_argument("--max-text-tokens", type=runs.number(low=1), default=media.MAX_TEXT_TOKENS,
                   help="cut every text to this many tokens, in training and evaluation (as embed.py does; "
                        "the official code: 650); the tiny world's texts are far shorter")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    again.add_argument("--overwrite", action="store_true",
                       help="replace an earlier run in --out (only what this run's stages write; never an input)")
    p.add_argument("--tiny-size", default="default", choices=sorted(tiny.SIZES),
                   help="size preset of the tiny model (smoke = for tests)")
    p.set_defaults(**recipe(argv))
    args = p.parse_args(argv)
    runs.settle_options(p, args)  # what argparse cannot check alone, and what --profile-steps implies
    return args


# ----------------------------------------------------------------------------- batches
# Every batch is a pure function of (seed, stage, step): a resumed run draws exactly
# the batches an uninterrupted one would have drawn. The tiny model's batches come from
# the synthetic world (lco_mini/tasks.py); a real backbone's from its jsonl.

def batch_seed(args, stage: str, step: int) -> int:
    return (args.seed * 1_000_003 + {"pretrain": 1, "contrastive": 2}[stage]) * 1_000_003 + step


def local_slice(examples: list) -> list:
    """This process's share of the global batch."""
    return examples[distributed.rank()::distributed.world_size()]


# ----------------------------------------------------------------------------- stages

def save_model(model, processor, folder: Path) -> None:
    """save_pretrained into a temporary folder, then rename: a folder that exists is complete."""
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    backbone.record_attention(tmp, model.config._attn_implementation)  # the tiny model's eager stays eager
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def build_tiny_init(args, out: Path) -> Path:
    """The randomly initialised tiny model (same seed: same weights), written by one process."""
    if distributed.is_main():
        tiny.build_tiny(out / "init", seed=args.seed, **tiny.SIZES[args.tiny_size])
    distributed.barrier()
    return out / "init"


def run_pretrain(args, device, out: Path, pairs: list | None) -> Path:
    """Stage 1: generative training. Returns the folder of the pretrained base model."""
    base = out / "base"
    if args.resume and base.exists():
        say(f"pretrain: {base} is complete, skipping")
        checkpoint.restore_rng(out / "pretrain.ckpt.pt", args.seed)  # as an uninterrupted run leaves pretraining
        return base
    if args.model == "tiny":  # from a random init, or from --continue-from (continual pretraining)
        init = Path(args.continue_from) if args.continue_from else build_tiny_init(args, out)
        # fp32 master weights (AdamW on bf16 weights would lose small updates); see --precision
        model, processor = backbone.load(init, device=device, dtype=torch.float32)
        for p in model.parameters():  # from scratch: every weight, towers included, is trained
            p.requires_grad_(True)
        source = lambda step: world_caption_examples(args.pretrain_batch, batch_seed(args, "pretrain", step),
                                                     args.pretrain_task, args.pretrain_mix, args.pretrain_qa)
    else:  # continual pretraining of a real backbone, with LoRA (merged at the end)
        model, processor = backbone.load(args.model, device=device)
        cut_long_texts(pairs, processor, args, "pretrain")
        lora.add_lora(model, r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout)
        distributed.broadcast_from_main([p for p in model.parameters() if p.requires_grad])
        source = lambda step: [(p.anchor, p.positive["text"]) for p in
                               data.jsonl_examples(pairs, args.pretrain_batch, step, batch_seed(args, "pretrain", 0))]

    run = Run("pretrain", model, args, out / "pretrain.ckpt.pt", args.pretrain_steps, args.pretrain_lr,
              args.pretrain_warmup, items_per_step=args.pretrain_batch, unit="seqs")
    model.train()
    steps = run.resume()  # all steps, or those after the checkpoint
    # The steps run on `worker`: the model itself, or for the tiny model in bf16 its bf16 copy, whose
    # gradients go to the fp32 model for AdamW (precision.Bf16Copy; autocast then changes nothing).
    bf16_copy = precision.Bf16Copy(model) if args.model == "tiny" and args.precision == "bf16" else None
    worker = bf16_copy.model if bf16_copy else model
    for step in steps:
        lr = run.set_lr(step)
        with run.timed("data"):  # this process's share of the step's (item, target text) pairs
            examples = local_slice(source(step))
        with run.timed("processor"):  # texts, images, audio -> token ids, pixels, mel features, labels
            inputs = generative_inputs(processor, examples, args.max_text_tokens)
        with run.timed("forward"):
            loss = generative_loss(worker, inputs, device, args.precision)
        with run.timed("backward"):
            loss.backward()
            if bf16_copy:
                bf16_copy.grads_to_master()
        loss, inputs = loss.detach(), None  # keep the number only: the graph would live into the next step
        run.optimizer_step(step, loss)  # average gradients across processes, clip, AdamW step
        if bf16_copy:
            with run.timed("optimizer"):
                bf16_copy.weights_from_master()
        run.log_and_checkpoint(step, lr)
        if step + 1 in args.snapshot_steps and distributed.is_main():  # a rung of the GRSL ladder
            save_model(model, processor, runs.snapshot_folder(out, step + 1))
    model.eval()

    if args.profile_steps and args.model != "tiny":
        return Path(args.model)  # --profile-steps writes no real model; contrastive steps are timed on this one
    if args.model != "tiny":
        model = lora.merge_lora(model)
    if distributed.is_main():
        save_model(model, processor, base)
    distributed.barrier()
    return base


def cut_long_texts(pairs: list | None, processor, args, name: str) -> None:
    """Cut the dataset's texts once (build_inputs would at every step), and never silently."""
    cut = data.cut_texts(pairs or [], processor.tokenizer, args.max_text_tokens)
    if cut:
        say(f"{name}: {cut} texts longer than --max-text-tokens {args.max_text_tokens} are cut to it")


def contrastive_source(args, pairs: list | None, processor):
    """step -> list of (anchor, positive, negative) item dicts, for the global batch. With
    --multimodal-ratio, that share of each batch is multimodal pairs (the paper's ~20%), the rest text."""
    seed = batch_seed(args, "contrastive", 0)
    if pairs is None:
        takes = backbone.input_kinds(processor)
        media = tuple(m for m in WORLD_MEDIA if MEDIA_KEY[m] in takes)
        return lambda step: world_pair_examples(args.batch_size, batch_seed(args, "contrastive", step),
                                                args.multimodal_ratio, media)
    triples = lambda chosen: [(p.anchor, p.positive, p.negative) for p in chosen]
    if not args.multimodal_ratio:
        return lambda step: triples(data.jsonl_examples(pairs, args.batch_size, step, seed))
    text, multimodal = data.split_by_modality(pairs)
    n_media = round(args.multimodal_ratio * args.batch_size)
    return lambda step: triples(data.jsonl_examples(text, args.batch_size - n_media, step, seed)
                                + data.jsonl_examples(multimodal, n_media, step, seed + 1))


def run_contrastive(args, device, base: Path, out: Path, pairs: list | None, name: str = "contrastive"):
    """Stage 2: text-only InfoNCE with LoRA on the language model of `base`, on the jsonl pairs or
    the world's (see contrastive_source). Returns the model, LoRA still unmerged, and its processor."""
    model, processor = backbone.load(base, device=device)
    cut_long_texts(pairs, processor, args, name)
    source = contrastive_source(args, pairs, processor)
    lora.add_lora(model, r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout)
    distributed.broadcast_from_main([p for p in model.parameters() if p.requires_grad])
    if device.type == "cuda":
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()  # LoRA-only training: checkpointed blocks need a grad-requiring input
    candidates = args.batch_size * (2 if args.hard_negatives else 1)
    micro = f" (GradCache micro-batch {args.micro_batch})" if args.micro_batch else ""
    say(f"{name}: global batch {args.batch_size} pairs -> {candidates} candidates per anchor{micro}")

    run = Run(name, model, args, out / f"{name}.ckpt.pt", args.steps, args.lr, args.warmup,
              items_per_step=args.batch_size, unit="pairs", log_extra=f" | {candidates} cands/anchor")
    model.train()
    for step in run.resume():
        lr = run.set_lr(step)
        with run.timed("data"):  # this process's (anchor, positive, hard negative) item dicts
            triples = local_slice(source(step))
            items = batch_items(triples, args)
        if args.micro_batch and len(items) > args.micro_batch:
            with run.timed("gradcache"):  # processor, forward and backward, in micro-batches
                loss = gradcache(model, processor, triples, args, device)
        else:
            with run.timed("processor"):
                inputs = backbone.build_inputs(processor, items, max_text_tokens=args.max_text_tokens)
            with run.timed("forward"):
                embeddings = embed_inputs(model, inputs, device, args.precision)
                loss = batch_loss(embeddings, len(triples), args)  # in fp32, outside autocast
            with run.timed("backward"):
                loss.backward()
        loss, inputs, embeddings = loss.detach(), None, None  # the number only: the graph would live on
        run.optimizer_step(step, loss / distributed.world_size())  # average gradients, clip, AdamW step
        run.log_and_checkpoint(step, lr)
    model.eval()
    return model, processor


def save_contrastive(model, processor, base: Path, out: Path, name: str):
    """Merge the LoRA weights and save: adapter/ + merged/ for the run, control/ for the control."""
    if name == "contrastive" and distributed.is_main():
        lora.save_adapter(model, out / "adapter", base_model_name_or_path=str(base))
    model = lora.merge_lora(model)
    if distributed.is_main():  # merged/ is what embed.py uses; control/ is kept for analyze.py
        save_model(model, processor, out / ("merged" if name == "contrastive" else name))
    return model, processor


def evaluate_models(args, device, out: Path, runs: dict, eval_pairs: list | None) -> None:
    """Held-out retrieval for each (name -> (model, processor)), on the world and on --eval-data;
    table printed, JSON saved."""
    results = {}
    for name, (model, processor) in runs.items():
        say(f"evaluating {name} ...")
        embedder = backbone.Embedder(model, processor, batch_size=32, device=device, progress=False,
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
    try:
        run_stages(args, device, out, setup)
    finally:
        if args.profile_steps:
            shutil.rmtree(out, ignore_errors=True)
    distributed.cleanup()


def run_stages(args, device, out: Path, setup: str) -> None:
    """Check everything, then pretrain, contrastive learning, control and evaluation, as asked."""
    replaced, pairs, pretrain_pairs, eval_pairs = runs.check_run(args, out)
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
        runs_to_evaluate["(a) base"] = backbone.load(base, device=device)
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
    except (TrainingError, data.DataError, runs.RunError, checkpoint.CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
