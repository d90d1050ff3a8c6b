"""Continual generative pretraining before text-only CL: the paper's SeaDoc experiment at laptop scale.

The paper: an MLLM retrieves documents of a low-resource language (SeaDoc) poorly after text-only
CL, because it barely reads them; a stage of continual *generative* pretraining on such documents
before the same CL raises retrieval. CL cannot activate an ability the base does not have.

The tiny world has its own low-resource script: documents in an invented "alien" script
(render.py), which the default pretraining never shows. Two arms start from the same base:

  cl_only            base -> the run's text-only CL
  continual_then_cl  base -> continual pretraining: half of every batch reads alien documents of
                     *training* numbers ("What does the above image say?" -> "the number 407"),
                     the other half replays the base's own pretraining mix (train.py
                     --continue-from base --pretrain-mix ...,alien=...) -> the same text-only CL

and both are measured on *held-out* numbers in the alien script: reading (the captioning probe's
R@1, before CL) and document -> text retrieval (R@1, R@5, after CL), and the same on Latin digits,
which shows what the continual stage cost the script the base already read.

  continual_mix(base_mix, alien)              the stage's --pretrain-mix: the alien script + replay
  continual_argv(base, out, mix, ...)         train.py's options for the continual stage
  measure_arm(folder, contrastive, ...)       one arm's per-query scores
  summary / table                             the JSON report and the printed table
"""
from __future__ import annotations

from pathlib import Path

import torch

from lco_mini.experiments import evaluation
from lco_mini.analysis import mean_interval
from lco_mini.experiments.rerun import embedder_after_cl
from lco_mini.tiny.tasks import PRETRAIN_MIX

ARMS = ("cl_only", "continual_then_cl")
SCRIPTS = ("alien", "latin")  # what the experiment is about first, then what the base already read


def continual_mix(base_mix: dict | None, alien: float) -> str:
    """--pretrain-mix of the continual stage: `alien` of every batch reads the invented script, the
    rest replays the base's own mix (its run_config.json's; the default when unknown). Without the
    replay, 100 steps of alien documents alone taught the alien script perfectly and erased the
    Latin one (probe R@1 100 % -> 0 %), and CL afterwards barely trained (docs/experiments.md)."""
    mix = {m: share for m, share in (base_mix or PRETRAIN_MIX).items() if m != "alien"}
    total = sum(mix.values())
    shares = {**{m: (1 - alien) * share / total for m, share in mix.items()}, "alien": alien}
    return ",".join(f"{m}={share:.6g}" for m, share in shares.items())


def continual_argv(base: Path, out: Path, mix: str, steps: int, lr: float, seed: int, batch: int = 32,
                   device: str | None = None, precision: str | None = None) -> list[str]:
    """train.py's command line for the continual stage: the tiny base pretrained further on `mix`
    (continual_mix), all weights trained as in its pretraining (a tiny model has no frozen towers
    worth keeping); no snapshots, no evaluation. device, precision: train.py's defaults when None."""
    chosen = [f"--{name}={value}" for name, value in (("device", device), ("precision", precision)) if value]
    return chosen + ["--stage", "pretrain", "--continue-from", str(base), "--out", str(out), "--seed", str(seed),
            "--pretrain-mix", mix, "--pretrain-steps", str(steps), "--pretrain-lr", str(lr),
            "--pretrain-batch", str(batch), "--pretrain-warmup", str(max(1, steps // 20)),
            "--snapshot-steps", "", "--log-every", str(max(1, steps // 4))]


def work(probe_n: int, cl_steps: int) -> int:
    """The progress-bar units of one arm: probe items per script, CL steps, one per retrieval."""
    return len(SCRIPTS) * (probe_n + 1) + cl_steps


def measure_arm(folder: Path, contrastive, device, probe_n: int, n: int, seed: int, cl_steps: int,
                batch_size: int = 32, max_text_tokens: int | None = None, bar=None) -> dict:
    """One arm: reading (the captioning probe, per held-out item) of the base in `folder`, then
    `contrastive(folder)` (the run's text-only CL, merged), then document -> text ranks per query.
    Both in the alien and the Latin script. JSON-ready; `bar` (a tqdm) advances by work()."""
    from lco_mini import backbone  # lazy: summary and table need no model code

    tick = (lambda k=1: bar.update(k)) if bar is not None else (lambda k=1: None)
    say = bar.set_description if bar is not None else (lambda text: None)
    model, processor = backbone.load(folder, device=device)
    reading = {}
    for script in SCRIPTS:
        say(f"{folder.parent.name}/{folder.name}: reading probe, {script} script")
        _, _, targets, nll = evaluation.caption_nlls(model, processor, "document", probe_n, seed,
                                                     progress=tick, script=script)
        reading[script] = (nll.argmin(1) == targets).double().tolist()
    del model
    say(f"{folder.parent.name}/{folder.name}: text-only CL")
    embedder = embedder_after_cl(contrastive, folder, device, batch_size, max_text_tokens)
    tick(cl_steps)
    say(f"{folder.parent.name}/{folder.name}: retrieval after CL")
    ranks = {}
    for script in SCRIPTS:
        ranks[script] = evaluation.retrieval_ranks(embedder, "document->text", n, seed, script=script).tolist()
        tick()
    return {"base": str(folder), "reading": reading, "ranks": ranks}


def _scores(arm: dict, script: str, n_boot: int, seed: int) -> dict:
    ranks = torch.tensor(arm["ranks"][script], dtype=torch.float64)
    reading = torch.tensor(arm["reading"][script], dtype=torch.float64)
    scores = {}
    for name, values in (("R@1", (ranks < 1).double()), ("R@5", (ranks < 5).double()), ("reading", reading)):
        scores[name] = 100 * values.mean().item()
        scores[name + "_ci"] = [100 * v for v in mean_interval(values, n_boot=n_boot, seed=seed)]
    return scores


def summary(arms: dict, steps: int, n_boot: int = 1000, seed: int = 0) -> dict:
    """The report: per arm, the alien script's R@1, R@5 and reading (%) with 95% bootstrap intervals
    over queries, the Latin script's under "latin"; and the gain of continual pretraining, (ii) - (i)
    on the same queries (a paired bootstrap), with its interval."""
    report = {}
    for name in ARMS:
        report[name] = {**_scores(arms[name], "alien", n_boot, seed),
                        "latin": _scores(arms[name], "latin", n_boot, seed)}
    gain = {}
    for script in SCRIPTS:
        before, after = (torch.tensor(arms[a]["ranks"][script], dtype=torch.float64) < 1 for a in ARMS)
        difference = after.double() - before.double()
        gain[script] = {"R@1": 100 * difference.mean().item(),
                        "R@1_ci": [100 * v for v in mean_interval(difference, n_boot=n_boot, seed=seed)]}
    report["gain"] = gain
    report["steps"] = steps
    return report


def table(report: dict) -> str:
    """The two arms side by side, per script: reading before CL, R@1 and R@5 after CL (%)."""
    names = {"cl_only": "(i) base -> CL", "continual_then_cl": "(ii) base -> continual -> CL"}
    fmt = lambda s, key: f"{s[key]:5.1f} [{s[key + '_ci'][0]:4.1f}, {s[key + '_ci'][1]:4.1f}]"  # noqa: E731
    share = report.get("options", {}).get("continual_share")
    lines = [f"documents of held-out numbers; continual stage: {report['steps']} steps"
             + (f", {share:.0%} of each batch reading the alien script" if share else "")
             + "; 95% bootstrap intervals over queries",
             f"{'script':<8}{'arm':<32}{'reading (probe R@1)':>22}{'doc->text R@1':>22}{'doc->text R@5':>22}"]
    for script in SCRIPTS:
        for arm in ARMS:
            s = report[arm] if script == "alien" else report[arm]["latin"]
            lines.append(f"{script:<8}{names[arm]:<32}{fmt(s, 'reading'):>22}{fmt(s, 'R@1'):>22}{fmt(s, 'R@5'):>22}")
        g = report["gain"][script]
        gain = f"{g['R@1']:+5.1f} [{g['R@1_ci'][0]:+.1f}, {g['R@1_ci'][1]:+.1f}]"
        lines.append(f"{'':<8}{'gain of (ii) over (i)':<32}{'':>22}{gain:>22}")
    return "\n".join(lines)
