"""A careless or unlucky user: memory bounded by the batch, one run per --out, no hang on a pipe,
and one line (exit 2, or 130 for Ctrl-C) for every failure a user causes, with nothing lost."""
import errno
import json
import os
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import analyze  # noqa: E402
import embed  # noqa: E402
import train  # noqa: E402
from lco_mini import backbone  # noqa: E402
from lco_mini.interop import export  # noqa: E402
from lco_mini.support import checkpoint, data, lock, media  # noqa: E402

SMOKE = ["--tiny-size", "smoke", "--pretrain-batch", "8", "--batch-size", "8"]


def one_error_line(capsys, expected: str) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err and "Traceback" not in err, err
    return err


# ----------------------------------------------------------------------------- memory bounded by the batch

def test_embed_py_checks_files_from_their_headers_and_decodes_none_up_front(tmp_path, monkeypatch):
    paths = []
    for i in range(5):
        Image.new("RGB", (640, 480), (40 * i, 0, 0)).save(tmp_path / f"{i}.jpg")
        paths.append(str(tmp_path / f"{i}.jpg"))
    decoded = []
    monkeypatch.setattr(media, "load_image", lambda *a, **k: decoded.append(a) or pytest.fail("decoded up front"))
    checked = embed.check_inputs(paths, ["a red circle"])
    assert [(label, modality, value) for label, modality, value in checked][:2] == [
        (paths[0], "image", paths[0]), (paths[1], "image", paths[1])]
    assert checked[-1] == ("a red circle", "text", "a red circle") and not decoded


def test_only_the_audio_window_of_a_long_file_is_read(omni_dir, tmp_path):
    """A long 48 kHz stereo recording: the tiny model hears 5 s, so 6 s are read and resampled."""
    path = tmp_path / "long.wav"
    soundfile.write(path, np.full((48_000 * 40, 2), 0.1, np.float32), 48_000)
    processor = backbone.load_processor(omni_dir)
    window = backbone.audio_window(processor)
    samples = backbone._decode(processor, "audio", path)
    assert len(samples) == (window + 1) * 16_000
    assert len(media.load_audio(path)) == 40 * 16_000  # without a window: the whole file
    assert media.audio_seconds(path) == pytest.approx(40.0)


def test_a_huge_text_is_cut_by_characters_before_it_is_tokenized(omni_dir, monkeypatch):
    tokenizer = backbone.load_processor(omni_dir).tokenizer
    seen, real_call = [], type(tokenizer).__call__

    def spy(self, text, *args, **kwargs):
        seen.append(len(text))
        return real_call(self, text, *args, **kwargs)

    monkeypatch.setattr(type(tokenizer), "__call__", spy)
    text = "the dog barks twice " * 1_000_000  # 20 MB
    cut, was_cut = backbone.truncate_text(tokenizer, text, 650)
    assert was_cut and max(seen) < 50_000
    monkeypatch.undo()
    assert len(tokenizer(cut, add_special_tokens=False)["input_ids"]) == 650
    exact, _ = backbone.truncate_text(tokenizer, text[:20_000], 650)
    assert cut == exact  # the same cut as on a text of normal size


# ----------------------------------------------------------------------------- one run per output folder

def test_a_second_run_on_a_locked_out_is_refused_with_the_holder(tmp_path, capsys):
    out = tmp_path / "out"
    with lock.hold(out, "train.py"):
        with pytest.raises(SystemExit) as stop:
            train.cli([*SMOKE, "--out", str(out)])
        assert stop.value.code == 2
        err = one_error_line(capsys, "is in use by another run")
        assert f"pid {os.getpid()}, train.py, started" in err
        with pytest.raises(SystemExit) as stop:
            analyze.main(["anisotropy", "--run", str(tmp_path), "--out", str(out)])
        assert stop.value.code == 2
        one_error_line(capsys, "is in use by another run")


def test_a_lock_left_by_a_killed_run_is_taken_over(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / lock.LOCK_NAME).write_text("pid 999999, train.py, started 2026-01-01 00:00:00\n")  # no flock held
    with lock.hold(out, "analyze.py anisotropy"):
        assert "analyze.py anisotropy" in (out / lock.LOCK_NAME).read_text()
    assert "taking over the lock of a run that ended without releasing it (pid 999999" in capsys.readouterr().out
    assert (out / lock.LOCK_NAME).read_text() == ""  # released cleanly this time


def test_embed_out_on_a_full_disk_keeps_the_earlier_file(tmp_path, monkeypatch, capsys):
    out = tmp_path / "emb.npy"
    np.save(out, np.ones((2, 3), np.float32))

    def full_disk(f, array):
        f.write(b"\x93NUMPY partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "save", full_disk)
    with pytest.raises(SystemExit) as stop:
        embed.save(str(out), [("a", "text", "a")], np.zeros((1, 3), np.float32))
    assert stop.value.code == 2
    one_error_line(capsys, "No space left on device")
    monkeypatch.undo()
    assert np.load(out).tolist() == np.ones((2, 3)).tolist() and sorted(os.listdir(tmp_path)) == ["emb.npy"]


# ----------------------------------------------------------------------------- never hang

def finishes(function, seconds: float = 10.0):
    """function() in a thread: (finished in time, what it raised or returned)."""
    result = {}
    worker = threading.Thread(target=lambda: result.update(value=_call(function)), daemon=True)
    worker.start()
    worker.join(seconds)
    return not worker.is_alive(), result.get("value")


def _call(function):
    try:
        return function()
    except Exception as error:  # the result under test
        return error


def test_a_fifo_is_refused_not_read(tmp_path):
    fifo = tmp_path / "sound.wav"
    os.mkfifo(fifo)
    for check in (lambda: media.probe(fifo), lambda: media.load_audio(fifo), lambda: media.load_image(fifo)):
        done, value = finishes(check)
        assert done and isinstance(value, media.MediaError) and "not a regular file" in str(value)
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text(json.dumps({"anchor": {"audio_path": str(fifo)}, "positive": {"text": "a hiss"}}) + "\n")
    done, value = finishes(lambda: data.read_jsonl(jsonl))
    assert done and isinstance(value, data.DataError) and "not a regular file" in str(value) and "line 1" in str(value)


def test_a_wav_through_a_pipe_is_one_line(tmp_path, capsys):
    read_end, write_end = os.pipe()
    try:
        with pytest.raises(SystemExit) as stop:
            embed.check_inputs([f"/proc/self/fd/{read_end}"], [])
    finally:
        os.close(read_end)
        os.close(write_end)
    assert stop.value.code == 2
    one_error_line(capsys, "not a regular file")


# ----------------------------------------------------------------------------- one line, exit 2

def test_unreadable_analyze_cache_entries_are_computed_again(tmp_path, capsys):
    path = tmp_path / "grsl-base-abc.json"
    for broken in ('{"points": [1, 2', "{}", ""):
        path.write_text(broken)
        assert analyze._cached(path, lambda: {"points": [3]}) == {"points": [3]}
        assert f"note: {path}: an unreadable cache entry" in capsys.readouterr().out
        assert json.loads(path.read_text()) == {"points": [3]}  # written again, whole


def test_a_truncated_cached_model_is_not_reused(omni_dir, tmp_path):
    import shutil

    folder = tmp_path / "base"
    shutil.copytree(omni_dir, folder)
    assert analyze._readable_model(folder)
    weights = next(folder.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert not analyze._readable_model(folder)


@pytest.mark.parametrize("make_out, expected", [
    (lambda tmp: (tmp / "taken").write_text("x") and tmp / "taken", "is a file, not a folder"),
    (lambda tmp: Path("/proc/lco_mini_analysis"), "cannot write"),
])
def test_analyze_checks_out_before_any_work(tmp_path, capsys, make_out, expected):
    with pytest.raises(SystemExit) as stop:
        analyze.main(["anisotropy", "--run", str(tmp_path), "--out", str(make_out(tmp_path))])
    assert stop.value.code == 2
    one_error_line(capsys, expected)


@pytest.mark.parametrize("command", ["grsl", "continual"])
def test_grsl_and_continual_refuse_options_they_do_not_use(command, tmp_path, capsys):
    for flag in ("--model", "--data"):
        with pytest.raises(SystemExit) as stop:
            analyze.main([command, flag, str(tmp_path / "nowhere"), "--out", str(tmp_path / "a")])
        assert stop.value.code == 2
        one_error_line(capsys, f"takes no {flag}")


def test_a_full_disk_while_saving_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "pretrain.ckpt.pt"
    checkpoint.save({"step": 1}, path)

    def full_disk(obj, f):
        f.write(b"x" * 100)
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(checkpoint.CheckpointError) as error:
        checkpoint.save({"step": 2}, path)
    message = str(error.value)
    assert f"could not write {path}" in message and "no space left" in message
    assert f"the last good checkpoint {path} is kept" in message and "\n" not in message
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["pretrain.ckpt.pt"] and torch.load(path)["step"] == 1


def test_a_full_disk_while_saving_a_model_removes_the_partial_folder(omni_dir, tmp_path, monkeypatch):
    model, processor = backbone.load(omni_dir, device="cpu")

    def full_disk(folder, *args, **kwargs):
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "model.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(model, "save_pretrained", full_disk)
    with pytest.raises(checkpoint.CheckpointError, match="could not write the model folder .*No space left"):
        export.save_model(model, processor, tmp_path / "merged")
    assert os.listdir(tmp_path) == []


def test_continue_from_a_vl_or_text_model_is_refused_before_anything_is_written(qwen2_vl_dir, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        train.cli([*SMOKE, "--stage", "pretrain", "--continue-from", str(qwen2_vl_dir), "--out", str(out)])
    assert stop.value.code == 2
    one_error_line(capsys, "a 'qwen2_vl' model; continual pretraining on the world needs a Qwen2.5-Omni thinker")
    assert not out.exists()


def test_a_deeply_nested_jsonl_line_is_one_line(tmp_path):
    path = tmp_path / "deep.jsonl"
    path.write_text("[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(data.DataError, match="line 1: nested too deeply"):
        data.read_jsonl(path)


def test_ctrl_c_in_train_py_names_the_checkpoint_and_the_command_that_resumes(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"

    def interrupted(args, device, out, setup, checked):
        (out / "pretrain.ckpt.pt").write_bytes(b"")
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "run_stages", interrupted)
    argv = [*SMOKE, "--out", str(out), "--overwrite"]
    with pytest.raises(SystemExit) as stop:
        train.cli(argv)
    assert stop.value.code == 130
    err = one_error_line(capsys, f"interrupted: the last checkpoint is {out / 'pretrain.ckpt.pt'}")
    assert err.strip().endswith("--out " + str(out) + " --resume") and "--overwrite" not in err


def test_ctrl_c_in_analyze_py_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(analyze, "run", lambda args: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(SystemExit) as stop:
        analyze.main(["anisotropy", "--out", str(tmp_path / "a")])
    assert stop.value.code == 130
    one_error_line(capsys, "interrupted: what was measured is kept in")
