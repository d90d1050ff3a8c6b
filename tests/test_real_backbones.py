"""The README's real-backbone commands, on tiny random configs of Qwen2-VL, Qwen2.5-VL and the
Qwen2.5-Omni thinker: continual pretraining, contrastive training on a jsonl with evaluation on
(world + the user's --eval-data), embed.py on the result; and the pieces between them: modalities a
backbone cannot take, epoch-wise sampling, --multimodal-ratio with --data, GradCache with dropout,
DDP batch divisibility."""
import hashlib
import json
import tempfile
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import embed  # noqa: E402
import train  # noqa: E402
from lco_mini import backbone, lora, losses, stages
from lco_mini.experiments import evaluation
from lco_mini.support import data, distributed, runs
from lco_mini.tiny import model as tiny, tasks  # noqa: E402

TEXTS = ["a red circle", "a blue square", "a green triangle", "the dog barks twice", "two small yellow stars",
         "a low tone", "a high tone", "a moving dot"]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def side(text="", image=""):
    return {"text": text, "image_path": image}


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    Image.new("RGB", (40, 32), "red").save(d / "red.png")
    pairs = [{"anchor": side(t), "positive": side(t.upper()), "negative": side(TEXTS[i - 1])} for i, t in enumerate(TEXTS)]
    pairs.append({"anchor": side(image="red.png"), "positive": side("a red image"), "negative": side("a blue image")})
    docs = [{"anchor": side(t), "positive": side(f"{t}, said again")} for t in TEXTS]
    docs.append({"anchor": side(image="red.png"), "positive": side("red")})
    held = [{"anchor": side(t), "positive": side(t)} for t in TEXTS[:5]]
    return write_jsonl(d / "pairs.jsonl", pairs), write_jsonl(d / "docs.jsonl", docs), write_jsonl(d / "held.jsonl", held)


def language_weights(folder: Path) -> dict:
    return {k: v for f in folder.glob("*.safetensors") for k, v in load_file(f).items()
            if k.endswith("layers.0.self_attn.q_proj.weight") and not any(t in k for t in ("audio", "visual"))}


@pytest.mark.parametrize("family", ["omni_dir", "qwen2_vl_dir", "qwen2_5_vl_dir"])
def test_continual_pretraining_contrastive_evaluation_and_embed(family, request, datasets, tmp_path, capsys):
    model_dir = request.getfixturevalue(family)
    pairs, docs, held = datasets
    out = tmp_path / "out"
    train.cli(["--model", str(model_dir), "--pretrain-data", str(docs), "--data", str(pairs), "--eval-data", str(held),
               "--steps", "2", "--batch-size", "4", "--pretrain-batch", "4", "--eval-n", "4", "--lora-r", "4",
               "--lora-alpha", "8", "--log-every", "1", "--out", str(out)])
    stdout = capsys.readouterr().out
    assert "pretrain: 3 steps = one epoch of 9 examples" in stdout and "pretrain step     2" in stdout
    before, after = language_weights(model_dir), language_weights(out / "base")
    assert before.keys() == after.keys() and len(before) == 1
    assert not torch.equal(*before.values(), *after.values())  # continual pretraining changed the weights
    results = json.loads((out / "eval.json").read_text())
    is_vl = family != "omni_dir"
    for run in ("(a) base", "(b) text-only CL"):
        assert ("skipped" in results[run]["audio->text"]) == is_vl
        assert results[run]["image->text"]["n"] == 4 and "R@5" in results[run]["image->text"]
        assert results[run]["data text->text"]["n"] == 5 and 0 < results[run]["data text->text"]["MRR"] <= 1
    if is_vl:
        assert "evaluation: skipping audio->text: Qwen2" in stdout and "takes no audio" in stdout

    Image.new("RGB", (32, 32), "blue").save(tmp_path / "blue.png")
    embed.main([str(tmp_path / "blue.png"), "--text", "a blue square", "--model", str(out / "merged"),
                "--out", str(tmp_path / "v.npy")])
    vectors = np.load(tmp_path / "v.npy")
    assert vectors.shape == (2, backbone.load_config(out / "merged")[1].get_text_config().hidden_size)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-4)


def test_audio_for_a_vl_backbone_is_a_clear_error(qwen2_vl_dir, tmp_path, capsys):
    import soundfile

    soundfile.write(tmp_path / "tone.wav", np.zeros(8000, np.float32), 16000)
    with pytest.raises(SystemExit) as exit_info:
        embed.main([str(tmp_path / "tone.wav"), "--model", str(qwen2_vl_dir)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and "tone.wav" in err[0] and "takes no audio" in err[0]
    media = stages.contrastive_source(train.get_args(["--multimodal-ratio", "1"]), None,
                                     backbone.load_processor(qwen2_vl_dir))
    kinds = {key for step in range(5) for anchor, _, _ in media(step) for key in anchor}
    assert kinds <= {"image", "video"} and kinds  # the world's calibration pairs skip audio
    evaluation.main([str(qwen2_vl_dir), "--n", "4"])
    table = capsys.readouterr().out
    assert "skipping audio->text: Qwen2VLProcessor takes no audio" in table
    assert [line.split()[1] for line in table.splitlines() if line.startswith("audio->text")] == ["skipped"]


def test_an_epoch_visits_every_pair_once():
    pairs = list(range(12))
    first = [p for step in range(4) for p in data.jsonl_examples(pairs, 3, step, seed=7)]
    second = [p for step in range(4, 8) for p in data.jsonl_examples(pairs, 3, step, seed=7)]
    assert sorted(first) == pairs and sorted(second) == pairs and first != second  # a new order each epoch
    assert data.jsonl_examples(pairs, 3, 5, seed=7) == data.jsonl_examples(pairs, 3, 5, seed=7)  # resumable
    assert sorted(data.jsonl_examples(pairs, 5, 0, seed=1) + data.jsonl_examples(pairs, 5, 1, seed=1)
                  + data.jsonl_examples(pairs, 2, 5, seed=1)) == pairs


def test_multimodal_ratio_mixes_the_jsonl_pairs(datasets, tmp_path, omni_dir):
    pairs, _ = data.read_jsonl(datasets[0], progress=False)
    for ratio, expected in ((0.5, 2), (0.25, 1)):
        args = train.get_args(["--model", "m", "--data", "x", "--batch-size", "4", "--multimodal-ratio", str(ratio)])
        source = stages.contrastive_source(args, pairs, processor=None)
        for step in range(3):
            batch = source(step)
            assert len(batch) == 4 and sum("image" in anchor for anchor, _, _ in batch) == expected
    plain = stages.contrastive_source(train.get_args(["--model", "m", "--batch-size", "4"]), pairs, processor=None)
    assert sum("image" in a for step in range(9) for a, _, _ in plain(step)) == 4  # 36 draws = 4 epochs of 9
    text_only = write_jsonl(tmp_path / "t.jsonl", [json.loads(line) for line in datasets[0].read_text().splitlines()[:8]])
    with pytest.raises(runs.RunError, match="has 0 multimodal and 8 text-only pairs"):
        args = train.get_args(["--model", str(omni_dir), "--data", str(text_only), "--multimodal-ratio", "0.2",
                               "--stage", "contrastive", "--out", str(tmp_path / "o")])
        runs.check_run(args, tmp_path / "o")


def test_a_batch_must_divide_among_the_processes(monkeypatch, omni_dir, tmp_path):
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    args = train.get_args(["--model", str(omni_dir), "--stage", "contrastive", "--batch-size", "8",
                           "--out", str(tmp_path / "o")])
    with pytest.raises(runs.RunError, match="--batch-size 8 must be divisible by the 3 processes"):
        runs.check_run(args, tmp_path / "o")
    fits = train.get_args(["--model", str(omni_dir), "--stage", "contrastive", "--batch-size", "9",
                           "--out", str(tmp_path / "o")])
    runs.check_run(fits, tmp_path / "o")  # --pretrain-batch 32 does not matter to a contrastive-only run


def test_gradcache_with_dropout_replays_the_masks(tmp_path):
    """With LoRA dropout > 0, GradCache's gradient must be the gradient of the loss it reports: the
    reference runs the same micro-batches with a graph, from the same RNG state."""
    folder = tiny.build_tiny(tmp_path / "m", seed=0, **tiny.SIZES["smoke"])
    model, processor = backbone.load(folder, device="cpu")
    lora.add_lora(model, r=4, lora_alpha=8, lora_dropout=0.05)
    torch.manual_seed(0)
    for _, layer in lora.lora_layers(model):
        torch.nn.init.normal_(layer.lora_B.weight, std=0.02)
    model.train()
    triples = tasks.world_pair_examples(6, seed=1, multimodal_ratio=0.0)
    args = train.get_args(["--micro-batch", "5"])
    params = [p for p in model.parameters() if p.requires_grad]

    torch.manual_seed(42)
    loss = losses.gradcache(model, processor, triples, torch.device("cpu"), args.micro_batch)
    cached = [p.grad.clone() for p in params]
    model.zero_grad()

    torch.manual_seed(42)
    anchors, positives, negatives = (list(x) for x in zip(*triples))
    items = anchors + positives + negatives
    embeddings = torch.cat([losses.embed_items(model, processor, items[i:i + 5], torch.device("cpu"))
                            for i in range(0, len(items), 5)])
    from lco_mini.infonce import infonce
    reference = infonce(embeddings[:6], embeddings[6:12], embeddings[12:], temperature=args.temperature)
    reference.backward()
    torch.testing.assert_close(loss, reference.detach(), atol=1e-5, rtol=0)
    for got, want in zip(cached, [p.grad for p in params]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    torch.manual_seed(43)  # a different mask: a different function (the test can fail)
    model.zero_grad()
    other = losses.gradcache(model, processor, triples, torch.device("cpu"), args.micro_batch)
    assert not torch.allclose(other, loss)


class HashEmbedder:
    """Equal items -> equal unit vectors, others random: retrieval with known answers."""
    @staticmethod
    def seed(item) -> int:
        return int(hashlib.sha1(json.dumps(item, sort_keys=True).encode()).hexdigest()[:8], 16)

    def embed(self, items):
        vectors = [torch.randn(16, generator=torch.Generator().manual_seed(self.seed(i)))
                   for i in items]
        return torch.nn.functional.normalize(torch.stack(vectors), dim=-1)


def test_eval_data_finds_copies_and_not_shuffled_pairs():
    texts = [f"item {i}" for i in range(20)]
    copies = [data.Pair({"text": t}, {"text": t}, None, i) for i, t in enumerate(texts)]
    result = evaluation.evaluate_pairs(HashEmbedder(), copies)["data text->text"]
    assert result["R@1"] == 1 and result["MRR"] == 1 and result["n"] == 20 and result["candidates"] == 20
    shuffled = [data.Pair({"text": t}, {"text": f"other {(i + 7) % 20}"}, None, i) for i, t in enumerate(texts)]
    result = evaluation.evaluate_pairs(HashEmbedder(), shuffled)["data text->text"]
    assert result["R@1"] <= 0.25 and result["MRR"] < 0.5  # chance: R@1 = 1/20


def test_profile_steps_on_a_real_backbone_writes_no_model(qwen2_vl_dir, datasets, tmp_path, capsys, monkeypatch):
    pairs, docs, _ = datasets
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setattr(tempfile, "tempdir", None)  # mkdtemp reads TMPDIR again
    train.cli(["--model", str(qwen2_vl_dir), "--pretrain-data", str(docs), "--data", str(pairs), "--profile-steps", "2",
               "--batch-size", "4", "--pretrain-batch", "4", "--lora-r", "4", "--lora-alpha", "8",
               "--out", str(tmp_path / "out")])
    stdout = capsys.readouterr().out
    assert "pretrain: where a step's time went" in stdout and "contrastive: where a step's time went" in stdout
    assert list(scratch.iterdir()) == [] and not (tmp_path / "out").exists()
