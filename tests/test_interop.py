"""Using a trained model elsewhere, checked against the libraries themselves as authorities:
sentence-transformers loads a folder train.py wrote (or lco_mini.interop.export completed) and gives
lco_mini's vectors for text, image, audio and video; the Python API's encode equals embed.py."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lco_mini.embedder import Embedder
from lco_mini.interop import export
from lco_mini.tiny import world

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # AutoModel reports lm_head as unused: it is
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # embed.py, as a user runs it
TOLERANCE = 1e-5  # max abs difference, fp32 on a CPU


def held_out(modality: str, n: int) -> list:
    return [item.media for item in world.items(modality, "heldout", n, seed=0)]


def sentence_transformer(folder):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(folder), device="cpu")


def max_diff(theirs, ours) -> float:
    return (torch.as_tensor(np.asarray(theirs), dtype=torch.float32) - ours).abs().max().item()


TEXTS = ["a red circle above a blue square", "the dog barks twice",
         "two small yellow stars, one big star! and a much longer sentence, so that the batch pads"]


def test_a_train_py_model_loads_in_sentence_transformers_with_lco_vectors(smoke_run):
    """merged/ of a train.py run: text, image, audio, video, image + text and a mixed batch."""
    folder = smoke_run / "merged"
    for name in ("modules.json", "sentence_bert_config.json", "1_Pooling/config.json",
                 "config_sentence_transformers.json", "lco_embedding_chat_template.jinja"):
        assert (folder / name).is_file(), name
    assert json.loads((folder / "1_Pooling" / "config.json").read_text())["pooling_mode"] == "lasttoken"
    st, ours = sentence_transformer(folder), Embedder.from_pretrained(folder, device="cpu", progress=False)
    assert st.similarity_fn_name == "cosine"
    images, audios, videos = held_out("image", 3), held_out("audio", 3), held_out("video", 2)
    pairs = [(images[0], "a red circle"), (images[1], TEXTS[1])]
    cases = {
        "text": (st.encode(TEXTS), ours.embed_texts(TEXTS)),
        "image": (st.encode(images), ours.embed_images(images)),
        "audio": (st.encode(audios), ours.embed_audios(audios)),
        "video": (st.encode([{"video": v} for v in videos]), ours.embed_videos(videos)),
        "image+text": (st.encode([{"image": i, "text": t} for i, t in pairs]), ours.embed_interleaved(pairs)),
        "mixed batch": (st.encode([TEXTS[2], images[0], TEXTS[0], audios[1]]),
                        ours.embed([{"text": TEXTS[2]}, {"image": images[0]}, {"text": TEXTS[0]}, {"audio": audios[1]}])),
    }
    for modality, (theirs, mine) in cases.items():
        assert max_diff(theirs, mine) <= TOLERANCE, modality
    for other in ("base", "control"):  # every model train.py writes
        assert (smoke_run / other / "modules.json").is_file() or not (smoke_run / other).exists(), other


@pytest.mark.parametrize("family", ["qwen2_vl_dir", "qwen2_5_vl_dir"])
def test_vl_families_export_text_and_image(family, request, tmp_path):
    """A folder the user already has, completed in place by the export command; VL models take no audio."""
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(request.getfixturevalue(family), folder)
    export.main([str(folder)])
    config = json.loads((folder / "sentence_bert_config.json").read_text())
    assert "audio" not in config["modality_config"]  # the VL processors have no audio part
    st, ours = sentence_transformer(folder), Embedder.from_pretrained(folder, device="cpu", progress=False)
    images = held_out("image", 3)
    assert max_diff(st.encode(TEXTS), ours.embed_texts(TEXTS)) <= TOLERANCE
    assert max_diff(st.encode(images), ours.embed_images(images)) <= TOLERANCE


def test_without_the_lco_template_the_vectors_differ(omni_dir, tmp_path):
    """The parity test can fail: the model's plain chat template (no LCO prompt) gives other vectors."""
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(omni_dir, folder)
    export.main([str(folder)])
    config_file = folder / "sentence_bert_config.json"
    config = json.loads(config_file.read_text())
    del config["processing_kwargs"]["chat_template"]
    config_file.write_text(json.dumps(config))
    images = held_out("image", 2)
    ours = Embedder.from_pretrained(folder, device="cpu", progress=False).embed_images(images)
    assert max_diff(sentence_transformer(folder).encode(images), ours) > 1e-3


def test_export_merges_an_adapter_into_a_new_folder(smoke_run, tmp_path, capsys):
    out = tmp_path / "st"
    export.main(["--model", str(smoke_run / "base"), "--adapter", str(smoke_run / "adapter"), "--out", str(out)])
    assert "note: sentence-transformers gives lco_mini's vectors except" in capsys.readouterr().out
    merged = Embedder.from_pretrained(smoke_run / "merged", device="cpu", progress=False).embed_texts(TEXTS)
    assert max_diff(sentence_transformer(out).encode(TEXTS), merged) <= TOLERANCE
    with pytest.raises(SystemExit) as stop:  # never over an existing folder
        export.main(["--model", str(smoke_run / "base"), "--out", str(out)])
    assert stop.value.code == 2


# ----------------------------------------------------------------------------- the Python API

def test_encode_takes_every_kind_of_input_and_equals_embed_py(smoke_run, tmp_path):
    """lco_mini.load(folder).encode(...) on texts, files and objects equals embed.py's --out vectors."""
    import lco_mini

    import embed

    samples = tmp_path / "samples"
    world.main(["--dump", str(samples), "--split", "heldout", "--n", "2"])
    files = [str(samples / name) for name in ("image_000.png", "audio_001.wav", "video_000.gif", "document_001.png")]
    out = tmp_path / "emb.npy"
    embed.main(["--model", str(smoke_run / "merged"), *files, "--text", TEXTS[0], "--out", str(out)])
    model = lco_mini.load(smoke_run / "merged", device="cpu", progress=False)
    vectors = model.encode(files + [TEXTS[0]], batch_size=2)
    assert isinstance(vectors, np.ndarray) and vectors.shape == (5, model.dim)
    assert np.abs(vectors - np.load(out)).max() <= TOLERANCE
    # one input -> one vector; torch on request; objects as well as paths
    one = model.encode(TEXTS[0], convert_to_tensor=True)
    assert one.shape == (model.dim,) and torch.allclose(one, torch.as_tensor(vectors[4]), atol=TOLERANCE)
    image, audio, frames = held_out("image", 1)[0], held_out("audio", 1)[0], held_out("video", 1)[0]
    mixed = model.encode([image, audio, [*frames], {"image": image, "text": "a red circle"}])
    expected = model.embed([{"image": image}, {"audio": audio}, {"video": frames}, {"image": image, "text": "a red circle"}])
    assert np.abs(mixed - expected.numpy()).max() <= TOLERANCE
    raw = model.encode(TEXTS[:2], normalize_embeddings=False)
    assert np.allclose(raw / np.linalg.norm(raw, axis=1, keepdims=True), model.encode(TEXTS[:2]), atol=1e-5)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0)


def test_api_arguments_are_checked(smoke_run):
    import lco_mini

    model = lco_mini.load(smoke_run / "merged", device="cpu", progress=False)
    with pytest.raises(TypeError, match="texts must be a list"):
        model.embed_texts("hello")  # would embed five characters
    with pytest.raises(TypeError, match="images must be a list"):
        model.embed_images("x.png")
    with pytest.raises(TypeError, match=r"texts\[1\] must be a str"):
        model.embed_texts(["a", None])
    for bad in (b"bytes", 3, None):
        with pytest.raises(TypeError, match="expected a text, a file path"):
            model.encode([bad])
    with pytest.raises(FileNotFoundError, match="missing.png: no such file"):
        model.encode(["missing.png"])
    with pytest.raises(ValueError, match="takes any of text, image"):
        model.encode([{"picture": "x.png"}])


def test_import_lco_mini_loads_no_torch():
    code = "import sys, lco_mini; assert 'torch' not in sys.modules; print(lco_mini.__all__)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "Embedder" in result.stdout and "load" in result.stdout


# ----------------------------------------------------------------------------- mteb, the paper's harness

@pytest.mark.parametrize("modality", ["image", "audio"])
def test_mteb_recall_on_the_world_equals_the_projects_evaluation(smoke_run, modality, tmp_path):
    """mteb's own retrieval evaluation (pytrec_eval) of the trained model on the world's held-out
    queries gives the Recall@1 and @5 that lco_mini.experiments.evaluation computes on the same ones."""
    from lco_mini.analysis import recall_at_k
    from lco_mini.experiments import evaluation
    from lco_mini.interop import mteb_model

    encoder = mteb_model.load(smoke_run / "merged", device="cpu")
    meta = encoder.mteb_model_meta
    assert meta.embed_dim == encoder.embedder.dim and str(meta.similarity_fn_name.value) == "cosine"
    assert set(meta.modalities) == {"text", "image", "audio", "video"}
    result = mteb_model.evaluate(encoder, [mteb_model.world_task(modality, n=40, seed=7)], tmp_path)
    scores = result.task_results[0].scores["test"][0]
    _, _, targets, queries, candidates = evaluation.embed_task(encoder.embedder, f"{modality}->text", 40, 7)
    ours = recall_at_k(queries, candidates, targets)
    for k in (1, 5):
        assert scores[f"recall_at_{k}"] == pytest.approx(ours[f"R@{k}"], abs=1e-5), k
