"""The continual-pretraining experiment (the paper's SeaDoc, lco_mini/experiments/continual.py): the alien
script in the pretraining mix, train.py --continue-from, the bootstrap interval of a mean against
a slow reference, the report against worked cases, and `analyze.py continual` end to end on a
smoke run, whose CL-only arm must be the run's own (b)."""
import hashlib
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import analyze  # noqa: E402  (the script, imported for its main)
import train as train_script  # noqa: E402
from conftest import SMOKE_RUN, train_here  # noqa: E402
from lco_mini import analysis, backbone, stages
from lco_mini.embedder import Embedder
from lco_mini.experiments import continual, evaluation
from lco_mini.tiny import render, tasks  # noqa: E402


# ----------------------------------------------------------------------------- the pieces

def mean_interval_slow(values, n_boot, seed, level=0.95):
    """Percentile interval of bootstrap means, with loops and the documented draw order."""
    generator = torch.Generator().manual_seed(seed)
    draws = torch.randint(len(values), (n_boot, len(values)), generator=generator).tolist()
    means = sorted(sum(values[i] for i in draw) / len(draw) for draw in draws)
    quantile = lambda q: torch.quantile(torch.tensor(means, dtype=torch.float64), q).item()  # noqa: E731
    return [quantile((1 - level) / 2), quantile(1 - (1 - level) / 2)]


@pytest.mark.parametrize("n, seed", [(7, 0), (31, 3), (200, 11)])
def test_mean_interval_matches_a_slow_reference(n, seed):
    values = (torch.rand(n, generator=torch.Generator().manual_seed(seed)) < 0.3).double().tolist()
    assert analysis.mean_interval(torch.tensor(values), n_boot=300, seed=seed) == pytest.approx(
        mean_interval_slow(values, 300, seed))


def test_mean_interval_worked_cases():
    assert analysis.mean_interval(torch.full((9,), 0.25), n_boot=50) == [0.25, 0.25]  # no spread, no interval
    low, high = analysis.mean_interval(torch.tensor([0.0, 1.0] * 50), n_boot=2000)
    assert low < 0.5 < high and high - low == pytest.approx(2 * 1.96 * 0.05, abs=0.03)  # binomial s.e. 0.05
    for bad in (torch.tensor([]), torch.tensor([1.0, float("nan")])):
        with pytest.raises(ValueError):
            analysis.mean_interval(bad)


def test_alien_in_the_mix_reads_the_invented_script():
    examples = tasks.world_caption_examples(10, seed=4, mix=tasks.parse_mix(continual.continual_mix(None, 1.0)))
    assert len(examples) == 10
    ink = {script: [] for script in ("drawn", "alien", "latin")}
    for item, target in examples:
        assert set(item) == {"image", "instruction"} and item["instruction"] == "What does the above image say?"
        number = re.search(r"\d{3}", target).group()
        ink["drawn"].append((np.array(item["image"])[..., 0] == 0).sum())  # glyphs drawn x2: 4 px per glyph pixel
        for script in ("alien", "latin"):
            ink[script].append(sum(4 * render.glyphs(script)[d].sum() for d in number))
    assert ink["drawn"] == ink["alien"] != ink["latin"]
    assert tasks.PRETRAIN_MIX["alien"] == 0  # the default pretraining never shows the alien script


def test_continual_mix_reads_the_alien_script_and_replays_the_base_mix():
    base = {"image": 0.5, "video": 0.0, "audio": 0.25, "document": 0.25, "text": 0.0, "alien": 0.0}
    mix = tasks.parse_mix(continual.continual_mix(base, 0.4))
    assert mix == pytest.approx({"image": 0.3, "video": 0.0, "audio": 0.15, "document": 0.15, "text": 0.0, "alien": 0.4})
    default = tasks.parse_mix(continual.continual_mix(None, 0.5))  # an unknown base mix: the default one
    assert default["alien"] == pytest.approx(0.5)
    assert default["image"] / default["text"] == pytest.approx(tasks.PRETRAIN_MIX["image"] / tasks.PRETRAIN_MIX["text"])
    alien = 0
    for item, target in tasks.world_caption_examples(32, seed=1, mix=default):
        if item.get("instruction") == tasks.DESCRIBE["document"]:
            ink = (np.array(item["image"])[..., 0] == 0).sum()
            alien += ink == sum(4 * render.glyphs("alien")[d].sum() for d in re.search(r"\d{3}", target).group())
    assert alien == 16  # half of every batch reads the alien script


def test_summary_and_table_worked_case():
    arms = {"cl_only": {"ranks": {"alien": [3, 0, 9, 7], "latin": [0, 0, 1, 2]},
                        "reading": {"alien": [0, 0, 0], "latin": [1, 1, 0]}},
            "continual_then_cl": {"ranks": {"alien": [0, 0, 2, 4], "latin": [0, 1, 1, 2]},
                                  "reading": {"alien": [1, 1, 0], "latin": [1, 0, 0]}}}
    report = continual.summary(arms, steps=10, n_boot=200)
    assert report["cl_only"]["R@1"] == 25 and report["cl_only"]["R@5"] == 50 and report["cl_only"]["reading"] == 0
    assert report["continual_then_cl"]["R@1"] == 50 and report["continual_then_cl"]["R@5"] == 100
    assert report["continual_then_cl"]["reading"] == pytest.approx(200 / 3)
    assert report["cl_only"]["latin"]["R@1"] == 50 and report["continual_then_cl"]["latin"]["R@1"] == 25
    assert report["gain"]["alien"]["R@1"] == 25 and report["gain"]["latin"]["R@1"] == -25
    for scores in (report["cl_only"], report["continual_then_cl"]["latin"]):
        for key in ("R@1", "R@5", "reading"):
            assert scores[key + "_ci"][0] <= scores[key] <= scores[key + "_ci"][1]
    assert report["steps"] == 10 and json.loads(json.dumps(report)) == report
    text = continual.table(report)
    assert "(ii) base -> continual -> CL" in text and "+25.0" in text and "-25.0" in text


# ----------------------------------------------------------------------------- train.py --continue-from

def digest(folder: Path) -> str:
    return hashlib.sha1(b"".join(p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file())).hexdigest()


def test_continue_from_pretrains_a_base_further_and_never_writes_it(smoke_run, tmp_path):
    before = digest(smoke_run / "base")
    mix = continual.continual_mix(json.loads((smoke_run / "run_config.json").read_text())["pretrain_mix"], 0.5)
    argv = continual.continual_argv(smoke_run / "base", tmp_path / "cont", mix, steps=3, lr=4e-4, seed=0, batch=8)
    result = train_here(argv)
    assert result.returncode == 0, result.stderr[-3000:]
    assert digest(smoke_run / "base") == before  # the input is read, never written
    assert not (tmp_path / "cont" / "init").exists()  # no random init: it starts from the base
    start = backbone.load(smoke_run / "base", device="cpu")[0].state_dict()
    after = backbone.load(tmp_path / "cont" / "base", device="cpu")[0].state_dict()
    assert start.keys() == after.keys()
    moved = [k for k in start if not torch.equal(start[k], after[k])]
    assert moved and any("visual" in k for k in moved)  # every weight trains, the vision tower too
    # step 0 starts from the base's weights: its loss is the base's loss on that batch
    args = train_script.get_args(argv)
    examples = tasks.world_caption_examples(8, stages.batch_seed(args, "pretrain", 0), mix=args.pretrain_mix)
    model, processor = backbone.load(smoke_run / "base", device="cpu")
    from lco_mini.losses import generative_inputs, generative_loss
    with torch.no_grad():
        loss = generative_loss(model, generative_inputs(processor, examples), torch.device("cpu"))
    logged = next(line for line in result.stdout.splitlines() if line.startswith("pretrain step     0"))
    assert float(logged.split("loss")[1].split("|")[0]) == pytest.approx(loss.item(), abs=2e-4)


def test_continue_from_bad_input_is_one_line(smoke_run, tmp_path, qwen2_vl_dir):
    result = train_here([*SMOKE_RUN, "--stage", "pretrain", "--continue-from", str(tmp_path / "nothing"),
                         "--out", str(tmp_path / "a")])
    assert result.returncode == 2 and "not a model folder" in result.stderr and "Traceback" not in result.stderr
    result = train_here(["--model", str(qwen2_vl_dir), "--continue-from", str(smoke_run / "base"),
                         "--out", str(tmp_path)])
    assert result.returncode == 2 and "--continue-from is for the tiny model" in result.stderr
    # its own output would replace the model it continues from: refused before anything is touched
    result = train_here([*SMOKE_RUN, "--stage", "pretrain", "--continue-from", str(smoke_run / "base"),
                         "--out", str(smoke_run), "--overwrite"])
    assert result.returncode == 2 and "--continue-from model" in result.stderr
    assert (smoke_run / "base" / "config.json").is_file()
    # --overwrite would delete every base-step*/ of --out, this input among them: refused too
    result = train_here([*SMOKE_RUN, "--stage", "pretrain", "--continue-from", str(smoke_run / "base-step4"),
                         "--out", str(smoke_run), "--overwrite"])
    assert result.returncode == 2 and "--continue-from model" in result.stderr
    assert (smoke_run / "base-step4" / "config.json").is_file() and (smoke_run / "base" / "config.json").is_file()


# ----------------------------------------------------------------------------- analyze.py continual

ARGS = ["--n", "12", "--probe-n", "3", "--boot", "50", "--continual-steps", "3"]


@pytest.fixture(scope="module")
def continual_report(smoke_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("continual")
    analyze.main(["continual", "--run", str(smoke_run), "--out", str(out), *ARGS])
    return out, json.loads((out / "continual.json").read_text())


def test_continual_writes_both_arms_and_a_plot(continual_report):
    out, report = continual_report
    for arm in ("cl_only", "continual_then_cl"):
        assert {"R@1", "R@5", "reading", "R@1_ci", "latin"} <= set(report[arm])
        assert 0 <= report[arm]["R@1"] <= report[arm]["R@5"] <= 100
    assert report["steps"] == 3 and report["options"]["cl_steps"] == 3  # the run's own CL steps
    assert (out / "continual.png").stat().st_size > 10_000
    arms = {path.name.split("-")[1]: json.loads(path.read_text()) for path in (out / "cache").glob("continual-*.json")}
    continued = Path(arms["continual_then_cl"]["base"])  # arm (ii) measured the continued base, in the cache
    assert continued.name == "base" and continued.parent.parent == out / "cache" and (continued / "config.json").is_file()
    assert Path(arms["cl_only"]["base"]).parent != continued.parent
    log = (out / "continual-train.log").read_text()
    assert "--continue-from" in log and "pretrain step     0" in log  # the continual stage's own log lines


def test_cl_only_arm_is_the_runs_own_contrastive_result(smoke_run, continual_report):
    """The CL-only arm is the run's CL from the run's RNG state: the same model as merged/, so
    the same rank for every Latin document query, and eval.json's document R@1."""
    out, report = continual_report
    arm = json.loads(next((out / "cache").glob("continual-cl_only-*.json")).read_text())
    embedder = Embedder.from_pretrained(smoke_run / "merged", device="cpu", progress=False)
    assert arm["ranks"]["latin"] == evaluation.retrieval_ranks(embedder, "document->text", 12, 1234).tolist()
    results = json.loads((smoke_run / "eval.json").read_text())["(b) text-only CL"]
    assert report["cl_only"]["latin"]["R@1"] == pytest.approx(100 * results["document->text"]["R@1"])
    alien = evaluation.retrieval_ranks(embedder, "document->text", 12, 1234, script="alien").tolist()
    assert arm["ranks"]["alien"] == alien


def test_continual_rerun_reads_its_cache(smoke_run, continual_report, monkeypatch):
    out, report = continual_report
    monkeypatch.setattr(continual, "measure_arm", lambda *a, **k: pytest.fail("measured again"))
    monkeypatch.setattr(train_script, "main", lambda *a, **k: pytest.fail("trained again"))
    analyze.main(["continual", "--run", str(smoke_run), "--out", str(out), *ARGS])
    assert json.loads((out / "continual.json").read_text()) == report


def test_continual_bad_input_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        analyze.main(["continual", "--run", str(tmp_path / "nothing")])
    assert exit_.value.code == 2 and "run `python train.py` first" in capsys.readouterr().err
    for bad in (["--continual-steps", "0"], ["--continual-lr", "-1"], ["--continual-lr", "nan"]):
        with pytest.raises(SystemExit) as exit_:
            analyze.main(["continual", *bad])
        assert exit_.value.code == 2 and "continual" in capsys.readouterr().err
