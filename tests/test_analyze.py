"""analyze.py end to end on tiny random backbones: its numbers equal the measures applied to
embeddings computed independently with lco_mini.Embedder; caching, skipping, --data, bad input."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import analyze  # noqa: E402  (the script, imported for its main)
from lco_mini import analysis, backbone
from lco_mini.embedder import Embedder
from lco_mini.tiny import tasks, world  # noqa: E402
from conftest import run_here  # noqa: E402

N = 9  # items per modality: small, odd, above k
FAST = ["--n", str(N), "--k", "3", "--null", "3", "--batch-size", "8"]


@pytest.fixture(scope="module")
def run_dir(omni_dir, tmp_path_factory):
    """A train.py-like output folder whose base, merged and control are tiny random Omni thinkers
    (base and merged are the same weights: a check that equal models give equal rows)."""
    run = tmp_path_factory.mktemp("run")
    for name in ("base", "merged", "control"):
        (run / name).symlink_to(omni_dir, target_is_directory=True)
    return run


def reference_embeddings(model_dir, modality):
    """The world items analyze.py measures, embedded here at every layer, independently."""
    model, processor = backbone.load(model_dir, device="cpu")
    embedder = Embedder(model, processor, batch_size=4, progress=False)
    items = world.items(modality, "heldout", N, 1234)
    media = embedder.embed([{tasks.MEDIA_KEY[modality]: item.media} for item in items], layers="all")
    captions = embedder.embed_texts([item.captions[0] for item in items], layers="all")
    return media, captions


def test_anisotropy_defaults_to_the_run_and_matches_the_measure(run_dir, omni_dir, tmp_path, capsys):
    analyze.main(["anisotropy", "--run", str(run_dir), "--out", str(tmp_path), *FAST])
    report = json.loads((tmp_path / "anisotropy.json").read_text())
    assert list(report["models"]) == ["base", "merged", "control"]
    base = report["models"]["base"]
    assert set(base) == {"text", "image", "video", "audio", "document"}
    layers = backbone.load(omni_dir)[0].config.get_text_config().num_hidden_layers + 1
    assert all(len(values) == layers for values in base.values())
    media, captions = reference_embeddings(omni_dir, "video")
    assert base["video"] == pytest.approx([analysis.anisotropy(layer) for layer in media], abs=1e-6)
    image_media, image_captions = reference_embeddings(omni_dir, "image")
    assert base["text"] == pytest.approx([analysis.anisotropy(layer) for layer in image_captions], abs=1e-6)
    assert base["video"][0] == pytest.approx(1.0)  # layer 0: every item ends in the same token
    assert report["models"]["merged"] == base and report["items"]["audio"] == N
    assert (tmp_path / "anisotropy.png").stat().st_size > 10_000
    printed = capsys.readouterr().out
    assert "final-layer anisotropy" in printed and f"{base['audio'][-1]:.3f}" in printed


def test_alignment_matches_the_measures_and_reuses_its_cache(run_dir, omni_dir, tmp_path, monkeypatch):
    args = ["alignment", "--model", str(run_dir / "base"), "--out", str(tmp_path), *FAST]
    analyze.main(args)
    report = json.loads((tmp_path / "alignment.json").read_text())
    entry = report["models"]["base"]["image"]
    media, captions = reference_embeddings(omni_dir, "image")
    assert entry["mutual_knn"] == pytest.approx([analysis.mutual_knn(a, b, 3) for a, b in zip(media, captions)])
    assert entry["unbiased_cka"][-1] == pytest.approx(analysis.cka(media[-1], captions[-1], unbiased=True), abs=1e-5)
    assert entry["cknna"][-1] == pytest.approx(analysis.cknna(media[-1], captions[-1], 3), abs=1e-5)
    null = analysis.permutation_null(lambda a, b: analysis.mutual_knn(a, b, 3), media[-1], captions[-1], n=3)
    assert entry["mutual_knn_null"][-1] == pytest.approx(list(null), abs=1e-6)
    assert entry["unbiased_cka"][0] is None  # identical layer-0 embeddings: undefined, written as null
    assert report["k"] == 3 and report["null_shuffles"] == 3
    monkeypatch.setattr(backbone, "load", lambda *a, **k: pytest.fail("the cached rerun loaded the model"))
    (tmp_path / "alignment.json").unlink()
    analyze.main(args)
    assert json.loads((tmp_path / "alignment.json").read_text()) == report


def test_a_vl_backbone_skips_audio_with_one_line(qwen2_vl_dir, tmp_path, capsys):
    analyze.main(["anisotropy", "--model", str(qwen2_vl_dir), "--out", str(tmp_path), *FAST])
    report = json.loads((tmp_path / "anisotropy.json").read_text())
    model = next(iter(report["models"].values()))
    assert set(model) == {"text", "image", "video", "document"}
    skipped = [line for line in capsys.readouterr().out.splitlines() if "skipping" in line]
    assert len(skipped) == 1 and "audio" in skipped[0] and "Qwen2VLProcessor" in skipped[0]


def test_data_file_groups_anchors_by_kind(omni_dir, tmp_path):
    colours = ["red", "green", "blue", "white", "black", "yellow"]
    rows = []
    for i, colour in enumerate(colours):
        Image.new("RGB", (32, 32), colour).save(tmp_path / f"{colour}.png")
        rows.append({"anchor": {"image_path": f"{colour}.png", "text": ""}, "positive": {"text": f"a {colour} square"}})
        rows.append({"anchor": {"text": f"{colour} thing {i}"}, "positive": {"text": f"something {colour}"}})
    rows.append(rows[0])  # a repeated pair is measured once
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "analysis"
    analyze.main(["alignment", "--model", str(omni_dir), "--data", str(path), "--out", str(out), "--k", "2", "--null", "2"])
    report = json.loads((out / "alignment.json").read_text())
    assert set(next(iter(report["models"].values()))) == {"image", "text"}
    assert report["items"]["image"] == 6 and report["items"]["text"] == 6


def run_cli(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "analyze.py", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_bad_input_is_one_line_without_traceback(tmp_path):
    not_a_model = tmp_path / "folder"
    not_a_model.mkdir()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"anchor": {"text": "a"}, "positive": {"text": "b"}}\n{"anchor": oops}\n')
    cases = [(["anisotropy", "--run", tmp_path / "nowhere"], "no such folder; run `python train.py` first"),
             (["anisotropy", "--model", not_a_model], "not a model folder (no config.json)"),
             (["alignment", "--model", tmp_path / "typo" / "merged"], "no such folder"),
             (["alignment", "--model", not_a_model.parent, "--k", "0"], "--k must be at least 1")]
    for i, (args, message) in enumerate(cases):
        # the first as a user runs it, a process; the others in this process, as a process would run them
        result = run_cli(*args) if i == 0 else run_here("analyze.py", args)
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1 and message in result.stderr and "Traceback" not in result.stderr


def test_data_errors_and_too_few_items(omni_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"anchor": {"text": "a"}, "positive": {"text": "b"}}\n{"anchor": oops}\n')
    with pytest.raises(SystemExit) as stop:
        analyze.main(["alignment", "--model", str(omni_dir), "--data", str(bad), "--out", str(tmp_path)])
    assert stop.value.code == 2 and "line 2" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        analyze.main(["alignment", "--model", str(omni_dir), "--n", "8", "--k", "10", "--out", str(tmp_path)])
    assert stop.value.code == 2 and "too few for --k 10" in capsys.readouterr().err
