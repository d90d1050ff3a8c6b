"""The Generation-Representation Scaling Law (GRSL) at laptop scale: a ladder of models of rising
generative ability, and what each one generates and, after the same text-only CL, represents.

The paper's law: across MLLMs, the better a model generates (captions, OCR), the better it
represents after text-only contrastive learning. Real MLLMs differ in a hundred ways at once;
the tiny model gives a controlled ladder instead: its own pretraining, stopped at increasing
steps (train.py saves base-step{N}/ at a few steps, and base/ is the last rung). Every rung then
gets the same text-only CL (seed, pairs, steps, lr: analyze.py runs train.py's stage), so only
the generative ability differs.

  rungs(run)            the ladder a train.py run left: [(step, folder)], base/ last
  generation_scores     the captioning probe, per query: is the top caption by likelihood the
                        right one, and the right caption's NLL
  representation_ranks  X -> text retrieval after CL, per query: the rank of the right caption
  fit / points          grsl_fit (lco_mini/analysis.py) per modality, and the plotted points
Per-query scores, so the fit's bootstrap can resample the held-out queries.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from lco_mini.experiments import evaluation
from lco_mini.analysis import grsl_fit
from lco_mini.experiments.rerun import embedder_after_cl

MODALITIES = ("image", "video", "audio", "document")
TASK = {modality: f"{modality}->text" for modality in MODALITIES}

# The paper's own points (generation score, representation score after text-only CL), read off
# its GRSL figure (arXiv 2510.11693): plotted beside ours for reference.
PAPER_POINTS = {
    "OCR tasks": {"LLaVA-Next-8B": (64, 66.5), "Qwen2.5-VL-3B": (78, 69.7), "Omni-3B": (77, 71.2),
                  "Omni-7B": (80.7, 73.4), "VL-7B": (81, 75.0)},
    "video->text R@1": {"VL-3B": (67.3, 37.5), "Omni-3B": (68.7, 41.3), "VL-7B": (70.6, 41.6),
                        "Omni-7B": (71.4, 45.1)},
    "audio->text R@1": {"Omni-3B": (66.1, 23.75), "Omni-7B": (69.9, 24.2)},
}


class LadderError(ValueError):
    """A run that leaves no ladder to measure (analyze.py prints it as one line)."""


def rungs(run: Path, quick: bool = False) -> list[tuple[int, Path]]:
    """(pretraining steps, model folder) of every rung a train.py run left, fewest steps first:
    its snapshots base-step{N}/ and base/ itself (at --pretrain-steps, from run_config.json).
    quick: only the first, middle and last rung."""
    run = Path(run)
    config = run / "run_config.json"
    if not (run / "base").is_dir() or not config.is_file():
        raise LadderError(f"{run}: no base/ and run_config.json; run `python train.py` first (or pass --run)")
    ladder = [(int(m.group(1)), folder) for folder in run.glob("base-step*")
              if folder.is_dir() and (m := re.fullmatch(r"base-step(\d+)", folder.name))]
    ladder = sorted(ladder + [(json.loads(config.read_text())["pretrain_steps"], run / "base")])
    if len(ladder) < 3:
        raise LadderError(f"{run}: {len(ladder)} rung(s) ({', '.join(f.name for _, f in ladder)}); a fit needs 3. "
                          "train.py leaves base-step{N}/ snapshots (--snapshot-steps, default auto): rerun it, "
                          "with --out elsewhere to keep this run")
    return [ladder[0], ladder[len(ladder) // 2], ladder[-1]] if quick else ladder


def generation_scores(model, processor, n: int, seed: int, progress=None) -> dict[str, dict[str, list]]:
    """modality -> {"correct": [0/1 per query], "nll": [the right caption's NLL per query]}: the
    captioning probe (evaluation.caption_nlls) on n held-out items of each modality."""
    scores = {}
    for modality in MODALITIES:
        _, _, targets, nll = evaluation.caption_nlls(model, processor, modality, n, seed, progress=progress)
        scores[modality] = {"correct": (nll.argmin(1) == targets).double().tolist(),
                            "nll": nll.gather(1, targets.view(-1, 1)).squeeze(1).tolist()}
    return scores


def representation_ranks(embedder, n: int, seed: int) -> dict[str, list[int]]:
    """modality -> the rank of each held-out query's caption (0 = retrieved first), X -> text."""
    return {modality: evaluation.retrieval_ranks(embedder, TASK[modality], n, seed).tolist()
            for modality in MODALITIES}


def work(probe_n: int, steps: int) -> int:
    """The progress-bar units of one rung: probe items, CL steps, one per retrieval task."""
    return len(MODALITIES) * (probe_n + 1) + steps


def measure_rung(folder: Path, step: int, contrastive, device, probe_n: int, n: int, seed: int, steps: int,
                 batch_size: int = 32, max_text_tokens: int | None = None, bar=None) -> dict:
    """One rung: the captioning probe on the base in `folder`, then `contrastive(folder)` (the
    text-only CL, returning the merged model and its processor), then retrieval. The JSON-ready
    scores, per query; `bar` (a tqdm) advances by work(probe_n, steps)."""
    from lco_mini import backbone  # lazy: the fit and the table need no model code

    tick = (lambda k=1: bar.update(k)) if bar is not None else (lambda k=1: None)
    say = bar.set_description if bar is not None else (lambda text: None)
    say(f"{folder.name}: captioning probe")
    model, processor = backbone.load(folder, device=device)
    generation = generation_scores(model, processor, probe_n, seed, progress=tick)
    del model
    say(f"{folder.name}: text-only CL, {steps} steps")
    embedder = embedder_after_cl(contrastive, folder, device, batch_size, max_text_tokens)
    tick(steps)
    say(f"{folder.name}: retrieval after CL")
    representation = representation_ranks(embedder, n, seed)
    tick(len(MODALITIES))
    return {"rung": folder.name, "step": step, "generation": generation, "representation": representation}


def _matrices(results: list[dict], modality: str) -> tuple[torch.Tensor, torch.Tensor]:
    """[R, Qg] generation hits and [R, Qr] R@1 hits of one modality, one row per rung."""
    gen = torch.tensor([r["generation"][modality]["correct"] for r in results], dtype=torch.float64)
    rep = torch.tensor([[float(rank == 0) for rank in r["representation"][modality]] for r in results],
                       dtype=torch.float64)
    return gen, rep


def points(results: list[dict]) -> list[dict]:
    """One point per rung and modality: caption R@1 (generation) and X -> text R@1 (representation), in %."""
    rows = []
    for result in results:
        for modality in MODALITIES:
            gen, rep = _matrices([result], modality)
            nll = result["generation"][modality]["nll"]
            rows.append({"rung": result["rung"], "step": result["step"], "modality": modality,
                         "generation": 100 * gen.mean().item(), "representation": 100 * rep.mean().item(),
                         "caption_nll": sum(nll) / len(nll)})
    return rows


def fit(results: list[dict], n_boot: int = 1000, seed: int = 0) -> dict[str, dict]:
    """modality -> grsl_fit over the rungs (scores in %, so the slope reads as points per point)."""
    fits = {}
    for modality in MODALITIES:
        gen, rep = _matrices(results, modality)
        full = grsl_fit(100 * gen, 100 * rep, n_boot=n_boot, seed=seed)
        fits[modality] = {key: full[key] for key in ("spearman", "spearman_ci", "pearson", "pearson_ci", "slope",
                                                     "slope_ci", "intercept", "undefined", "n_boot")}
    return fits


def table(rows: list[dict], fits: dict) -> str:
    """The points (caption R@1 -> retrieval R@1 per rung) and each modality's fit, as text."""
    rungs_seen = list(dict.fromkeys((r["step"], r["rung"]) for r in rows))
    lines = ["generation (caption R@1 %) -> representation after CL (X->text R@1 %), per rung:",
             f"{'rung':<16}{'step':>6}" + "".join(f"{m:>18}" for m in MODALITIES)]
    for step, rung in rungs_seen:
        cells = {r["modality"]: r for r in rows if r["rung"] == rung}
        lines.append(f"{rung:<16}{step:>6}" + "".join(
            f"{cells[m]['generation']:>8.1f} -> {cells[m]['representation']:>5.1f}" for m in MODALITIES))
    fmt = lambda v: "n/a" if v is None else f"{v:+.2f}"  # noqa: E731
    ci = lambda v: "[n/a]" if v is None else f"[{v[0]:+.2f}, {v[1]:+.2f}]"  # noqa: E731
    lines.append("fit per modality (95% bootstrap intervals over queries):")
    for modality, f in fits.items():
        lines.append(f"  {modality:<9} Spearman {fmt(f['spearman'])} {ci(f['spearman_ci']):<17} "
                     f"Pearson {fmt(f['pearson'])} {ci(f['pearson_ci']):<17} slope {fmt(f['slope'])} {ci(f['slope_ci'])}")
    return "\n".join(lines)
