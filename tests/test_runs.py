"""train.py never loses work: the output-folder rules of lco_mini/support/runs.py, --resume, and the
up-front checks of numbers, models and data, each run as a user runs it (train.py's cli on the
smoke-size tiny model, in this process: conftest.run_here). A refused run exits 2 with one error
line naming the input, and every folder it was given is byte-identical afterwards."""
import hashlib
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402
from lco_mini.support import checkpoint, runs  # noqa: E402
from conftest import train_here  # noqa: E402
from test_train import SMOKE  # noqa: E402

PAIR = {"anchor": {"text": "a red circle"}, "positive": {"text": "a circle, red"}, "negative": {"text": "a blue one"}}


def digest(folder: Path) -> dict:
    """relative path -> sha1 of every file under folder: equal digests = byte-identical folders."""
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def refused_here(capsys, argv, *needles) -> str:
    """The one error line of a run refused before any training (exit 2, no traceback), checked to
    contain needles; run in this process, to save the seconds of a new interpreter's imports."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        train.cli([str(a) for a in argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished smoke run: pretraining (base/) and one contrastive step (adapter/, merged/)."""
    out = tmp_path_factory.mktemp("run") / "out"
    result = train_here([*SMOKE, "--out", str(out), "--pretrain-steps", "2", "--steps", "2", "--no-eval",
                         "--ckpt-every", "1"])
    assert result.returncode == 0, result.stderr[-2000:]
    return out


@pytest.fixture
def copy_of(run_dir, tmp_path):
    def copy(name="o2"):
        return Path(shutil.copytree(run_dir, tmp_path / name))
    return copy


def test_overwrite_never_deletes_the_model_folder_inside_out(copy_of):
    out = copy_of()
    before = digest(out / "base")
    result = train_here([*SMOKE, "--model", str(out / "base"), "--out", str(out), "--overwrite", "--steps", "1",
                         "--no-eval"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert digest(out / "base") == before and (out / "merged" / "config.json").is_file()


def test_a_model_folder_is_never_an_output(copy_of, capsys):
    model = copy_of() / "merged"
    before = digest(model)
    for extra in ([], ["--overwrite"]):
        refused_here(capsys, [*SMOKE, "--model", model, "--out", model, "--stage", "contrastive", "--steps", "1",
                              "--no-eval", *extra], "the --model folder", "choose another --out")
        assert digest(model) == before


def test_bad_data_with_overwrite_keeps_the_old_run(copy_of, tmp_path, capsys):
    out = copy_of()
    before = digest(out)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(PAIR) + "\n{broken\n")
    refused_here(capsys, [*SMOKE, "--model", out / "base", "--out", out, "--overwrite", "--data", bad, "--steps", "1",
                          "--no-eval"], "line 2: not valid JSON")
    assert digest(out) == before


def test_resume_and_overwrite_are_exclusive(run_dir, capsys):
    before = digest(run_dir)
    refused_here(capsys, [*SMOKE, "--out", run_dir, "--resume", "--overwrite"], "not allowed with argument")
    assert digest(run_dir) == before


def test_resume_says_what_it_continues_and_refuses_what_it_cannot(copy_of, tmp_path, capsys):
    out = copy_of()
    same = [*SMOKE, "--pretrain-steps", "2", "--steps", "2", "--no-eval", "--ckpt-every", "1", "--out", str(out)]
    resumed = train_here([*same, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resume: pretrain is complete" in resumed.stdout and "contrastive continues at step 2 of 2" in resumed.stdout
    refused_here(capsys, [*same[:-1], tmp_path / "typo", "--resume"], "typo does not exist", "nothing to resume")
    empty = tmp_path / "empty"
    empty.mkdir()
    refused_here(capsys, [*same[:-1], empty, "--resume"], "nothing to resume")
    changed = [a if a != "2" else "3" for a in same]  # --steps 3 (and --pretrain-steps 3)
    refused_here(capsys, [*changed, "--resume"], "was written with other options", "steps 2 -> 3")
    (out / "contrastive.ckpt.pt").write_bytes(b"cut short by a full disk")
    refused_here(capsys, [*same, "--resume"], f"{out / 'contrastive.ckpt.pt'}: not a readable checkpoint")


def test_trainable_weights_load_strictly(tmp_path):
    model = torch.nn.Linear(3, 2)
    state = {"model": {"weight": torch.zeros(2, 3)}}  # the bias is missing
    with pytest.raises(checkpoint.CheckpointError, match="1 trainable weights missing"):
        checkpoint.load_trainable(model, state, tmp_path / "x.ckpt.pt")
    state["model"]["bias"] = torch.zeros(5)
    with pytest.raises(checkpoint.CheckpointError, match="does not fit"):
        checkpoint.load_trainable(model, state, tmp_path / "x.ckpt.pt")
    state["model"]["bias"] = torch.ones(2)
    checkpoint.load_trainable(model, state, tmp_path / "x.ckpt.pt")
    assert torch.equal(model.bias.detach(), torch.ones(2))


@pytest.mark.parametrize("flag,value,message", [
    ("--steps", "0", "must be >= 1"), ("--steps", "-1", "must be >= 1"), ("--batch-size", "0", "must be >= 1"),
    ("--lr", "-1", "must be > 0"), ("--lr", "nan", "must be > 0"), ("--temperature", "0", "must be > 0"),
    ("--micro-batch", "-3", "must be >= 0"), ("--lora-r", "0", "must be >= 1"), ("--log-every", "0", "must be >= 1"),
    ("--ckpt-every", "0", "must be >= 1"), ("--lora-dropout", "1", "must be < 1"), ("--steps", "2.5", "an integer"),
])
def test_numbers_are_validated_before_any_work(flag, value, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.get_args([flag, value])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and flag in err[0] and message in err[0], err


def test_flag_mistakes_are_one_line(tmp_path, capsys):
    refused_here(capsys, ["--model", "out/mergd", "--out", tmp_path / "o"], "out/mergd: no such folder")
    refused_here(capsys, ["--model", "out/mergd", "--stage", "pretrain", "--out", tmp_path / "o"], "needs --pretrain-data")
    refused_here(capsys, ["--device", "cuda:99", "--out", tmp_path / "o"], "--device")
    assert not (tmp_path / "o").exists()


def test_long_texts_are_cut_and_counted(run_dir, tmp_path):
    long = dict(PAIR, positive={"text": "a circle that is red " * 50})
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps(PAIR) + "\n" + json.dumps(long) + "\n")
    result = train_here([*SMOKE, "--model", str(run_dir / "base"), "--stage", "contrastive", "--data", str(data),
                         "--out", str(tmp_path / "o"), "--steps", "1", "--no-eval", "--max-text-tokens", "12"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "contrastive: 1 texts longer than --max-text-tokens 12 are cut to it" in result.stdout


def test_media_the_backbone_cannot_take_is_a_data_error(qwen2_vl_dir, tmp_path, capsys):
    import soundfile
    import numpy as np
    from PIL import Image

    soundfile.write(tmp_path / "tone.wav", np.zeros(1600, np.float32), 16000)
    Image.new("RGB", (4000, 10)).save(tmp_path / "strip.png")
    for name, anchor, needle in [("audio", {"audio_path": "tone.wav"}, "takes no audio"),
                                 ("strip", {"image_path": "strip.png"}, "aspect ratio over 200:1")]:
        data = tmp_path / f"{name}.jsonl"
        data.write_text(json.dumps(PAIR) + "\n" + json.dumps(dict(PAIR, anchor=anchor)) + "\n")
        refused_here(capsys, ["--model", qwen2_vl_dir, "--stage", "contrastive", "--data", data, "--out", tmp_path / name,
                              "--steps", "1", "--no-eval", "--batch-size", "2"], "line 2", needle)
        assert not (tmp_path / name).exists()


def test_stage_by_stage_run_is_allowed_but_never_overwrites(tmp_path):
    """--stage pretrain then --stage contrastive is the documented way to run stages separately."""
    out = tmp_path / "o"
    (out / "base").mkdir(parents=True)
    args = train.get_args(["--stage", "contrastive", "--out", str(out)])
    assert runs.check_output_folder(args, out) == []  # only pretraining outputs exist: fine
    (out / "merged").mkdir()
    with pytest.raises(runs.RunError, match=r"already holds a run \(merged\)"):
        runs.check_output_folder(args, out)
    again = train.get_args(["--stage", "contrastive", "--out", str(out), "--overwrite"])
    assert runs.check_output_folder(again, out) == [out / "merged"]  # what would be deleted, once all is checked
    assert (out / "base").exists() and (out / "merged").exists()


def test_checks_that_must_come_before_anything_is_deleted(copy_of, tmp_path, capsys):
    """Each of these used to fail only after --overwrite had deleted the old run, or mid-training."""
    from transformers import Qwen2Config

    out = copy_of()
    before = digest(out)
    text_only = tmp_path / "qwen2"
    Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1).save_pretrained(text_only)
    refused_here(capsys, ["--model", text_only, "--out", out, "--overwrite", "--stage", "contrastive"],
                 "'qwen2' model is not a multimodal")
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps(PAIR) + "\n")
    refused_here(capsys, [*SMOKE, "--out", out, "--overwrite", "--stage", "contrastive", "--eval-data", one,
                          "--no-hard-negatives"], "fewer than 2 distinct positives")
    (out / "merged" / "held.jsonl").write_text(json.dumps(PAIR) + "\n" + json.dumps(PAIR) + "\n")
    refused_here(capsys, [*SMOKE, "--out", out, "--overwrite", "--stage", "contrastive",
                          "--eval-data", out / "merged" / "held.jsonl"], "the --eval-data file")
    (out / "merged" / "held.jsonl").unlink()
    shutil.rmtree(out / "base")
    before = {k: v for k, v in before.items() if not k.startswith("base/")}  # base-step*/ stay
    refused_here(capsys, [*SMOKE, "--out", out, "--overwrite", "--stage", "contrastive"], "base does not exist")
    assert digest(out) == before  # merged/ and adapter/ survived
    refused_here(capsys, ["--seed", "-1", "--out", tmp_path / "s"], "--seed")
    docs = tmp_path / "docs.jsonl"
    docs.write_text(json.dumps({"anchor": {"text": "a"}, "positive": {"text": "b"}}) + "\n"
                    + json.dumps({"anchor": {"text": "a"}, "positive": {"image_path": "none.png"}}) + "\n")
    (tmp_path / "none.png").write_bytes((ROOT / "docs" / "analysis" / "anisotropy.png").read_bytes())
    refused_here(capsys, ["--model", run_dir_of(out), "--pretrain-data", docs, "--stage", "pretrain",
                          "--out", tmp_path / "p"], "line 2: the positive of a pretraining pair must be text only")


def run_dir_of(copied: Path) -> Path:
    """A model folder to pass as --model: the copied run's merged model."""
    return copied / "merged"


def test_resume_after_pretraining_draws_what_an_uninterrupted_run_draws(run_dir, copy_of):
    """Killed during CL, a --resume run restores the RNG of the end of pretraining: the same LoRA init."""
    out = copy_of()
    for name in ("adapter", "merged", "contrastive.ckpt.pt"):
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    result = train_here([*SMOKE, "--out", str(out), "--pretrain-steps", "2", "--steps", "2", "--no-eval",
                         "--ckpt-every", "1", "--resume"])
    assert result.returncode == 0, result.stderr[-2000:]
    from safetensors.torch import load_file
    again, first = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (out, run_dir))
    assert again.keys() == first.keys() and all(torch.equal(again[k], first[k]) for k in first)
