"""embed.py, the command line, run as a user runs it against a tiny random model: its main(argv)
in this process (conftest.run_here: exit code, stdout, stderr, as `python embed.py` gives them,
without a new interpreter's seconds of importing torch + transformers), and once as a process,
with a strict UTF-8 stdout.

Good input: exit 0, one printed line per input with its modality and dimension,
a similarity table naming every file and text, and saved vectors (.npy / .jsonl)
that equal what `lco_mini.Embedder` computes in-process. Bad input: exit 2 and
exactly one line on stderr naming the input.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import embed  # noqa: E402  (the script, imported for its in-process pieces)
from conftest import run_here  # noqa: E402

CORPUS = ["a red circle", "a blue square", "a high tone", "a low tone", "a moving dot"]
TEXTS = ["a red circle", "a high tone"]


def run_embed(*args, timeout=120) -> subprocess.CompletedProcess:
    """`python embed.py ARGS`, run in this process (conftest.run_here); timeout: unused there."""
    return run_here("embed.py", args, env={"TOKENIZERS_PARALLELISM": "false"})


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    from lco_mini.tiny.model import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny_omni"), seed=0, corpus=CORPUS)


@pytest.fixture(scope="session")
def files(tmp_path_factory):
    """An image, a 1 s tone, a 4-frame animated GIF (a video) and a folder of 3 frames (a video)."""
    d = tmp_path_factory.mktemp("media")
    image = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(image).ellipse((12, 12, 52, 52), fill="red")
    image.save(d / "circle.png")
    t = np.arange(16000) / 16000
    soundfile.write(d / "tone.wav", (0.5 * np.sin(2 * np.pi * 880 * t)).astype(np.float32), 16000)
    frames = []
    for k in range(4):
        frame = Image.new("RGB", (64, 64), "black")
        ImageDraw.Draw(frame).rectangle((8 * k, 20, 8 * k + 16, 36), fill="blue")
        frames.append(frame)
    frames[0].save(d / "moving.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    (d / "frames").mkdir()
    for k, frame in enumerate(frames[:3]):
        frame.save(d / "frames" / f"frame_{k}.png")
    return {"image": d / "circle.png", "audio": d / "tone.wav", "video": d / "moving.gif", "folder": d / "frames"}


def inputs_of(files):
    return [files["image"], files["audio"], files["video"], files["folder"]]


def test_prints_each_input_and_the_similarity_table(model_dir, files):
    text_args = [a for t in TEXTS for a in ("--text", t)]
    result = run_embed(*inputs_of(files), *text_args, "--model", model_dir, "--batch-size", 2)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    hidden = json.loads((model_dir / "config.json").read_text())["text_config"]["hidden_size"]
    expected = [("image", files["image"]), ("audio", files["audio"]), ("video", files["video"]),
                ("video", files["folder"])] + [("text", t) for t in TEXTS]
    for (modality, label), line in zip(expected, lines):  # input order: files, then texts
        assert line.split()[0] == modality and str(label) in line and f"dim {hidden}  [" in line, line
    table = lines[lines.index(next(l for l in lines if l.startswith("cosine similarity"))):]
    rows = [l for l in table if any(l.startswith(str(f)) for f in inputs_of(files))]
    assert len(rows) == 4
    for row in rows:  # one cosine per text, each in [-1, 1], then the best text by name
        cells = [float(c) for c in row.split()[1:1 + len(TEXTS)]]
        assert all(-1.0001 <= c <= 1.0001 for c in cells)
        best = TEXTS[int(np.argmax(cells))]
        assert row.rstrip().endswith(repr(best))
    for j, text in enumerate(TEXTS, 1):
        assert f"  T{j} = {text!r}" in table


def test_npy_equals_the_in_process_embedder(model_dir, files, tmp_path):
    out = tmp_path / "emb.npy"
    result = run_embed(*inputs_of(files), "--text", TEXTS[0], "--model", model_dir, "--out", out)
    assert result.returncode == 0, result.stderr
    assert "saved 5 vectors" in result.stdout
    vectors = np.load(out)
    assert vectors.dtype == np.float32 and vectors.shape[0] == 5
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)

    from lco_mini.embedder import Embedder

    # The reference decodes the paths itself: the CLI's decode-first path must not change a vector.
    embedder = Embedder.from_pretrained(str(model_dir), device="cpu", progress=False)
    reference = embedder.embed([{"image": files["image"]}, {"audio": files["audio"]}, {"video": files["video"]},
                                {"video": files["folder"]}, {"text": TEXTS[0]}]).numpy()
    np.testing.assert_allclose(vectors, reference, atol=1e-5)
    # Different inputs, different vectors: the test above could not pass with a constant output.
    assert np.abs(vectors[:, None] - vectors[None]).sum(-1)[np.triu_indices(5, 1)].min() > 1e-4


def test_jsonl_has_one_object_per_input(model_dir, files, tmp_path):
    out = tmp_path / "emb.jsonl"
    result = run_embed(files["image"], "--text", "  a blue square ", "--model", model_dir, "--out", out)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["input"], r["modality"]) for r in records] == [(str(files["image"]), "image"), ("a blue square", "text")]
    for r in records:
        assert np.linalg.norm(r["vector"]) == pytest.approx(1.0, abs=1e-5)
    assert "cosine similarity" in result.stdout and "'a blue square'" in result.stdout


def bad_inputs(tmp: Path, model: Path) -> dict:
    """name -> (arguments, text the error line must contain)."""
    good = Image.new("RGB", (32, 32), "green")
    good.save(tmp / "good.png")
    data = (tmp / "good.png").read_bytes()
    (tmp / "corrupt.png").write_bytes(data[: len(data) // 2])  # a truncated download
    (tmp / "notes.txt").write_text("not media")
    Image.new("RGB", (10000, 1)).save(tmp / "line.png")
    (tmp / "out.npy").mkdir()
    adapters = {}
    for name, config in {"malformed": "{not json", "no_weights": {"r": 4, "target_modules": ["q_proj"]},
                         "unfitting": {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]},
                         "merged": {"r": 4, "target_modules": ["q_proj"], "base_model_name_or_path": str(tmp)}}.items():
        adapters[name] = tmp / f"adapter_{name}"
        adapters[name].mkdir()
        (adapters[name] / "adapter_config.json").write_text(config if isinstance(config, str) else json.dumps(config))
        if name != "no_weights":
            import torch
            from safetensors.torch import save_file
            save_file({"base_model.model.nope.lora_A.weight": torch.zeros(4, 4)},
                      adapters[name] / "adapter_model.safetensors")
    m = ["--model", model]
    good_png = [tmp / "good.png", *m]
    return {
        "out is a folder": ([*good_png, "--out", tmp / "out.npy"], "out.npy: is a folder"),
        "out not writable": ([*good_png, "--out", "/proc/emb.npy"], "/proc/emb.npy"),
        "malformed adapter config": ([*good_png, "--adapter", adapters["malformed"]], "not a readable adapter config"),
        "missing adapter weights": ([*good_png, "--adapter", adapters["no_weights"]],
                                    "adapter_no_weights: the adapter's weights are missing"),
        "adapter does not fit": ([*good_png, "--adapter", adapters["unfitting"]], "does not fit this model"),
        "adapter already merged": ([*good_png, "--adapter", adapters["merged"]], "already contains its adapter"),
        "adapter as model": ([tmp / "good.png", "--model", adapters["merged"]], "it is a LoRA adapter: pass it as --adapter"),
        "no such gpu": ([*good_png, "--device", "cuda:99"], "--device cuda:99"),
        "bad device": ([*good_png, "--device", "gpu"], "not a device"),
        "10000 x 1 image": ([tmp / "line.png", *m], "line.png: 10000 x 1 pixels: an aspect ratio over 200:1"),
        "missing file": ([tmp / "nope.png", *m], "nope.png: no such file"),
        "corrupt png": ([tmp / "good.png", tmp / "corrupt.png", *m], "corrupt.png: not a readable image"),
        "unknown extension": ([tmp / "notes.txt", *m], "notes.txt: unsupported file type '.txt'"),
        "empty text": ([tmp / "good.png", "--text", "ok", "--text", "  ", *m], "--text #2"),
        "no inputs": ([*m], "no inputs"),
        "bad --out": ([tmp / "good.png", "--out", tmp / "emb.csv", *m], "emb.csv: --out must end in .npy or .jsonl"),
        "missing model dir": ([tmp / "good.png", "--model", tmp / "no_model"], "no_model: no such folder"),
        "unknown option": ([tmp / "good.png", "--colour", "red", *m], "unrecognized arguments"),
    }


@pytest.mark.parametrize("case", ["missing file", "corrupt png", "unknown extension", "empty text",
                                  "no inputs", "bad --out", "missing model dir", "unknown option",
                                  "out is a folder", "out not writable", "malformed adapter config",
                                  "missing adapter weights", "adapter does not fit", "adapter already merged",
                                  "adapter as model", "no such gpu", "bad device", "10000 x 1 image"])
def test_user_mistakes_give_one_line_and_exit_2(case, tmp_path, model_dir):
    args, needle = bad_inputs(tmp_path, model_dir)[case]
    result = run_embed(*args, timeout=60)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_missing_default_model_says_how_to_make_it(tmp_path, monkeypatch, capsys):
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    monkeypatch.chdir(tmp_path)  # no out/merged here
    with pytest.raises(SystemExit) as exit_info:
        embed.main(["x.png"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [err[0]] and err[0].startswith(f"error: no model at {embed.DEFAULT_MODEL}: run `python train.py`")


def test_help_documents_the_commands():
    result = run_embed("--help", timeout=60)
    assert result.returncode == 0
    for needle in ["--text", "--out", "--model", "--adapter", "--device", "--batch-size", "emb.npy", "emb.jsonl"]:
        assert needle in result.stdout


def test_out_keeps_its_suffix_case_and_names_the_real_file(model_dir, files, tmp_path):
    out = tmp_path / "X.NPY"
    result = run_embed(files["image"], "--model", model_dir, "--out", out)
    assert result.returncode == 0, result.stderr
    assert f"to {out}" in result.stdout and out.is_file() and not (tmp_path / "X.NPY.npy").exists()
    assert np.load(out).shape[0] == 1


def test_a_non_utf8_file_name_and_cut_audio_are_reported_not_a_traceback(model_dir, tmp_path):
    """The name reaches Python as surrogates; a strict UTF-8 stdout must not raise on it. Audio past
    the model's window (5 s for the tiny model) is cut by the processor: one line says so."""
    name = os.fsdecode(b"tone-\xff.wav")
    with open(tmp_path / name, "wb") as f:
        soundfile.write(f, np.zeros(7 * 16000, np.float32), 16000, format="WAV")
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONIOENCODING="utf-8:strict")
    result = subprocess.run([sys.executable, "embed.py", os.path.join(tmp_path, name), "--model", str(model_dir)],
                            cwd=ROOT, env=env, capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    stdout = result.stdout.decode()
    assert "tone-\\udcff.wav" in stdout and "Traceback" not in result.stderr.decode(errors="replace")
    assert "7.0 s of audio; the model uses the first 5 s" in stdout
