"""The GRSL experiment: train.py's snapshots (the ladder), grsl_fit against slow references and
worked cases, and `analyze.py grsl` end to end on a smoke run, whose last rung must reproduce the
run's own (b) query by query."""
import json
import math
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import analyze  # noqa: E402  (the script, imported for its main)
from lco_mini import analysis, backbone
from lco_mini.embedder import Embedder
from lco_mini.experiments import evaluation, ladder  # noqa: E402

from conftest import SMOKE_RUN as SMOKE, train_here  # noqa: E402  (smoke_run: a run of 8 pretraining steps)


# ----------------------------------------------------------------------------- slow references

def ranks_slow(values):
    """Average 1-based ranks, by sorting: tied values share the mean of their positions."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks, i = [0.0] * len(values), 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def pearson_slow(x, y):
    mx, my = sum(x) / len(x), sum(y) / len(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else float("nan")


def fit_slow(gen, rep, n_boot, seed):
    """grsl_fit's numbers with loops, drawing the same bootstrap indices in the documented order."""
    x, y = [sum(row) / len(row) for row in gen], [sum(row) / len(row) for row in rep]
    generator = torch.Generator().manual_seed(seed)
    gen_draws = torch.randint(len(gen[0]), (n_boot, len(gen[0])), generator=generator).tolist()
    rep_draws = torch.randint(len(rep[0]), (n_boot, len(rep[0])), generator=generator).tolist()
    boot = []
    for gd, rd in zip(gen_draws, rep_draws):
        bx = [sum(row[i] for i in gd) / len(gd) for row in gen]
        by = [sum(row[i] for i in rd) / len(rd) for row in rep]
        boot.append(pearson_slow(ranks_slow(bx), ranks_slow(by)))
    return x, y, boot


# ----------------------------------------------------------------------------- grsl_fit

@pytest.mark.parametrize("values", [[3.0, 1.0, 2.0], [1.0, 1.0, 2.0, 0.5, 1.0], [0.0] * 4, [2.0, 2.0, 1.0, 1.0, 3.0, 2.0]])
def test_average_ranks_match_the_sorting_reference(values):
    assert analysis.average_ranks(torch.tensor(values, dtype=torch.float64)).tolist() == ranks_slow(values)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_correlations_and_slope_match_numpy(seed):
    rng = np.random.default_rng(seed)
    x, y = rng.normal(size=7), rng.normal(size=7)
    x[2] = x[5]  # a tie
    tx, ty = torch.tensor(x), torch.tensor(y)
    assert analysis.pearson(tx, ty).item() == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-12)
    assert analysis.slope(tx, ty).item() == pytest.approx(np.polyfit(x, y, 1)[0], abs=1e-12)
    assert analysis.spearman(tx, ty).item() == pytest.approx(pearson_slow(ranks_slow(list(x)), ranks_slow(list(y))))


def test_worked_cases():
    # y = 2x + 1: r = rho = 1, slope 2, intercept 1
    gen = torch.tensor([[0.1], [0.4], [0.5], [0.9]])
    fit = analysis.grsl_fit(gen, 2 * gen + 1, n_boot=50)
    assert fit["pearson"] == pytest.approx(1) and fit["spearman"] == pytest.approx(1)
    assert fit["slope"] == pytest.approx(2) and fit["intercept"] == pytest.approx(1)
    # one query per rung: every resample is the same point set, so the intervals are the point
    assert fit["slope_ci"] == pytest.approx([2, 2]) and fit["spearman_ci"] == pytest.approx([1, 1])
    # by hand: ranks of y = 1, 2, 3.5, 5, 3.5 -> rho = 8 / sqrt(10 * 9.5)
    rho = analysis.spearman(torch.tensor([1.0, 2, 3, 4, 5]), torch.tensor([5.0, 6, 7, 8, 7])).item()
    assert rho == pytest.approx(8 / math.sqrt(95))
    assert analysis.spearman(torch.tensor([1.0, 2, 3]), torch.tensor([3.0, 2, 1])).item() == pytest.approx(-1)


def test_bootstrap_matches_the_loop_reference_and_holds_the_point():
    rng = random.Random(0)
    gen = [[float(rng.random() < p) for _ in range(9)] for p in (0.1, 0.3, 0.5, 0.7, 0.9)]
    rep = [[float(rng.random() < p) for _ in range(11)] for p in (0.2, 0.2, 0.4, 0.6, 0.8)]
    fit = analysis.grsl_fit(torch.tensor(gen), torch.tensor(rep), n_boot=200, seed=3)
    x, y, boot = fit_slow(gen, rep, 200, 3)
    assert fit["generation"] == pytest.approx(x) and fit["representation"] == pytest.approx(y)
    assert fit["spearman"] == pytest.approx(pearson_slow(ranks_slow(x), ranks_slow(y)))
    defined = sorted(v for v in boot if not math.isnan(v))
    assert fit["undefined"] == len(boot) - len(defined)
    expected = torch.quantile(torch.tensor(defined, dtype=torch.float64), torch.tensor([0.025, 0.975], dtype=torch.float64))
    assert fit["spearman_ci"] == pytest.approx(expected.tolist())
    assert fit["spearman_ci"][0] <= fit["spearman"] <= fit["spearman_ci"][1]
    assert analysis.grsl_fit(torch.tensor(gen), torch.tensor(rep), n_boot=200, seed=3) == fit  # seeded


def test_undefined_fit_is_none_not_a_number():
    gen = torch.zeros(4, 6)  # every rung at chance 0: no correlation to measure
    fit = analysis.grsl_fit(gen, torch.rand(4, 6), n_boot=20)
    assert fit["pearson"] is None and fit["spearman"] is None and fit["slope"] is None
    assert fit["spearman_ci"] is None and fit["undefined"] == 20
    json.dumps(fit, allow_nan=False)  # valid JSON


@pytest.mark.parametrize("gen, rep, message", [
    (torch.zeros(2, 5), torch.zeros(2, 5), "at least 3 rungs"),
    (torch.zeros(3, 5), torch.zeros(4, 5), "same R"),
    (torch.zeros(5), torch.zeros(5), "same R"),
    (torch.full((3, 2), float("nan")), torch.zeros(3, 2), "finite"),
])
def test_grsl_fit_bad_input(gen, rep, message):
    with pytest.raises(ValueError, match=message):
        analysis.grsl_fit(gen, rep)


# ----------------------------------------------------------------------------- the ladder: snapshots

def weights(folder):
    return backbone.load(folder, device="cpu")[0].state_dict()


def test_snapshots_are_the_ladder_and_do_not_change_training(smoke_run, tmp_path):
    assert [(step, f.name) for step, f in ladder.rungs(smoke_run)] == [
        (1, "base-step1"), (2, "base-step2"), (4, "base-step4"), (6, "base-step6"), (8, "base")]
    rungs = [weights(folder) for _, folder in ladder.rungs(smoke_run)]
    for earlier, later in zip(rungs, rungs[1:]):
        changed = [k for k in earlier if not torch.equal(earlier[k], later[k])]
        assert len(changed) > len(earlier) / 2  # each rung is a different model (towers and LM trained)
    # the same pretraining without snapshots ends in the same base: saving them draws no randomness
    result = train_here([*SMOKE, "--out", str(tmp_path), "--pretrain-steps", "8", "--stage", "pretrain",
                         "--snapshot-steps", ""])
    assert result.returncode == 0, result.stderr[-3000:]
    assert not list(tmp_path.glob("base-step*"))
    plain = weights(tmp_path / "base")
    assert all(torch.equal(plain[k], v) for k, v in rungs[-1].items())


def test_overwrite_replaces_the_snapshots_of_an_earlier_run(smoke_run, tmp_path):
    first = train_here([*SMOKE, "--out", str(tmp_path), "--pretrain-steps", "4", "--stage", "pretrain"])
    assert first.returncode == 0, first.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.glob("base-step*")) == ["base-step1", "base-step2", "base-step3"]
    again = train_here([*SMOKE, "--out", str(tmp_path), "--pretrain-steps", "6", "--stage", "pretrain",
                        "--snapshot-steps", "5"])
    assert again.returncode == 2 and "--resume" in again.stderr  # never replaced silently
    again = train_here([*SMOKE, "--out", str(tmp_path), "--pretrain-steps", "6", "--stage", "pretrain",
                        "--snapshot-steps", "5", "--overwrite"])
    assert again.returncode == 0 and "base-step1" in again.stdout  # named in what --overwrite replaces
    assert sorted(p.name for p in tmp_path.glob("base-step*")) == ["base-step5"]


@pytest.mark.parametrize("value, message", [("5,x", "expected steps"), ("8", "between 1 and"), ("0", "between 1 and")])
def test_bad_snapshot_steps_are_one_line(tmp_path, value, message):
    result = train_here([*SMOKE, "--out", str(tmp_path), "--pretrain-steps", "8", "--snapshot-steps", value])
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not list(tmp_path.iterdir())


def test_snapshots_are_for_the_tiny_model(qwen2_vl_dir, tmp_path):
    result = train_here(["--model", str(qwen2_vl_dir), "--stage", "contrastive", "--out", str(tmp_path),
                         "--snapshot-steps", "3"])
    assert result.returncode == 2 and "tiny model" in result.stderr


# ----------------------------------------------------------------------------- analyze.py grsl

@pytest.fixture(scope="module")
def grsl_report(smoke_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("grsl")
    analyze.main(["grsl", "--run", str(smoke_run), "--out", str(out), "--n", "12", "--probe-n", "3", "--boot", "50"])
    return out, json.loads((out / "grsl.json").read_text())


def test_grsl_writes_points_fit_and_plot(grsl_report):
    out, report = grsl_report
    assert report["rungs"] == ["base-step1", "base-step2", "base-step4", "base-step6", "base"]
    assert len(report["points"]) == 5 * 4
    assert set(report["fit"]) == set(ladder.MODALITIES)
    for fit in report["fit"].values():
        assert {"spearman", "spearman_ci", "pearson", "slope", "slope_ci"} <= set(fit)
    assert (out / "grsl.png").stat().st_size > 10_000
    assert "--- " in (out / "grsl-train.log").read_text()  # the CL's log lines went to the log


def test_last_rung_reproduces_the_runs_own_contrastive_result(smoke_run, grsl_report):
    """The rung at base/ gets the run's CL from the run's RNG state: the same model as merged/,
    so the same rank for every query, and eval.json's R@1."""
    out, report = grsl_report
    cached = [json.loads(p.read_text()) for p in (out / "cache").glob("grsl-base-*.json")]
    top = next(c for c in cached if c["rung"] == "base")
    embedder = Embedder.from_pretrained(smoke_run / "merged", device="cpu", progress=False)
    results = json.loads((smoke_run / "eval.json").read_text())["(b) text-only CL"]
    for modality in ladder.MODALITIES:
        ranks = evaluation.retrieval_ranks(embedder, f"{modality}->text", 12, 0 + 1234).tolist()
        assert top["representation"][modality] == ranks, modality
        point = next(p for p in report["points"] if p["rung"] == "base" and p["modality"] == modality)
        assert point["representation"] == pytest.approx(100 * results[f"{modality}->text"]["R@1"])


def test_generation_score_is_the_captioning_probe(smoke_run, grsl_report):
    _, report = grsl_report
    model, processor = backbone.load(smoke_run / "base-step4", device="cpu")
    for modality in ("image", "audio"):
        probe = evaluation.captioning(model, processor, modality, n=3, seed=1234)
        point = next(p for p in report["points"] if p["rung"] == "base-step4" and p["modality"] == modality)
        assert point["generation"] == pytest.approx(100 * probe["R@1"])


def test_grsl_rerun_reads_its_cache(smoke_run, grsl_report, tmp_path, monkeypatch):
    out, report = grsl_report
    monkeypatch.setattr(ladder, "measure_rung", lambda *a, **k: pytest.fail("measured again"))
    analyze.main(["grsl", "--run", str(smoke_run), "--out", str(out), "--n", "12", "--probe-n", "3", "--boot", "50"])
    assert json.loads((out / "grsl.json").read_text()) == report
    analyze.main(["grsl", "--run", str(smoke_run), "--out", str(out), "--n", "12", "--probe-n", "3", "--boot", "50",
                  "--quick", "--steps", "3"])  # --quick: first, middle, last rung (here cached too)
    assert json.loads((out / "grsl.json").read_text())["rungs"] == ["base-step1", "base-step4", "base"]


def test_grsl_bad_input_is_one_line(smoke_run, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        analyze.main(["grsl", "--run", str(tmp_path / "nothing")])
    assert exit_.value.code == 2 and "run `python train.py` first" in capsys.readouterr().err
    short = tmp_path / "short"
    short.mkdir()
    for name in ("base", "base-step4", "run_config.json"):
        (short / name).symlink_to(smoke_run / name)
    with pytest.raises(SystemExit):
        analyze.main(["grsl", "--run", str(short)])
    assert "a fit needs 3" in capsys.readouterr().err
