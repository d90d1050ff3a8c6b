"""The two training stages of LCO-Emb, each one flat loop: what `python train.py` runs.

  run_pretrain      stage 1, generative: next-token loss on (item, target text) pairs. The tiny
                    model learns its world from scratch (every weight); a real backbone gets
                    continual pretraining on --pretrain-data with LoRA, merged at the end.
  run_contrastive   stage 2, text-only InfoNCE with LoRA on the language model (GradCache
                    with --micro-batch); returns the model with LoRA still unmerged.
  save_contrastive  merge the LoRA weights and save: adapter/ + merged/ (or control/).

Each loop reads top to bottom: draw the batch, build the inputs, forward, backward, optimizer
step, log and checkpoint. What a step computes is in losses.py, the bookkeeping around it
(AdamW, lr schedule, resume, log lines) in loop.py. `args` is train.py's options; analyze.py
reruns run_contrastive with a run's own options (lco_mini/experiments/rerun.py).
"""
from __future__ import annotations

from pathlib import Path

import torch

from lco_mini import backbone, lora
from lco_mini.interop.export import save_model
from lco_mini.loop import Run
from lco_mini.losses import batch_items, batch_loss, embed_inputs, generative_inputs, generative_loss, gradcache
from lco_mini.support import checkpoint, data, distributed, precision, runs
from lco_mini.support.distributed import say
from lco_mini.tiny import model as tiny
from lco_mini.tiny.tasks import MEDIA_KEY, WORLD_MEDIA, world_caption_examples, world_pair_examples


# ----------------------------------------------------------------------------- batches
# Every batch is a pure function of (seed, stage, step): a resumed run draws exactly
# the batches an uninterrupted one would have drawn. The tiny model's batches come from
# the synthetic world (lco_mini/tiny/tasks.py); a real backbone's from its jsonl.

def batch_seed(args, stage: str, step: int) -> int:
    return (args.seed * 1_000_003 + {"pretrain": 1, "contrastive": 2}[stage]) * 1_000_003 + step


def local_slice(examples: list) -> list:
    """This process's share of the global batch."""
    return examples[distributed.rank()::distributed.world_size()]


# ----------------------------------------------------------------------------- stages

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
                                                     args.pretrain_mix)
    else:  # continual pretraining of a real backbone, with LoRA (merged at the end)
        model, processor = backbone.load(args.model, device=device, precision_used=args.precision)
        cut_long_texts(pairs, processor, args, "pretrain")
        lora.add_lora(model, r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout)
        distributed.broadcast_from_main([p for p in model.parameters() if p.requires_grad])
        # on every device: the whole --pretrain-batch goes through at once (no micro-batches here)
        checkpoint_activations(model)
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


def checkpoint_activations(model) -> None:
    """Keep only each layer's input for the backward pass and recompute the rest there. A 3B model
    holds ~11 MB of activations a token without it: one CPU pretraining step of 8 image-caption
    sequences peaked at 19.6 GB (python -m bench.real_size). LoRA-only training needs a
    grad-requiring input to every checkpointed block, or no gradient reaches the adapters."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()  # transformers 5 renamed gradient_checkpointing_enable (the old name warns)
    model.enable_input_require_grads()


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
    model, processor = backbone.load(base, device=device, precision_used=args.precision)
    cut_long_texts(pairs, processor, args, name)
    source = contrastive_source(args, pairs, processor)
    lora.add_lora(model, r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout)
    distributed.broadcast_from_main([p for p in model.parameters() if p.requires_grad])
    if device.type == "cuda":  # on a CPU, --micro-batch (GradCache) bounds the activations instead
        checkpoint_activations(model)
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
            items = batch_items(triples, args.hard_negatives)
        if args.micro_batch and len(items) > args.micro_batch:
            with run.timed("gradcache"):  # processor, forward and backward, in micro-batches
                loss = gradcache(model, processor, triples, device, args.micro_batch, args.hard_negatives,
                                 args.temperature, args.max_text_tokens, args.precision)
        else:
            with run.timed("processor"):
                inputs = backbone.build_inputs(processor, items, max_text_tokens=args.max_text_tokens)
            with run.timed("forward"):
                embeddings = embed_inputs(model, inputs, device, args.precision)
                loss = batch_loss(embeddings, len(triples), args.temperature)  # fp32, outside autocast
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
