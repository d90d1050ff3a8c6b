"""evaluation.py: held-out queries, their candidates, and recall on an oracle embedder."""
import numpy as np
import pytest
import torch

from lco_mini.experiments import evaluation
from lco_mini.tiny import tasks, world


def test_more_queries_than_combinations_repeat_captions_not_media():
    n_audio = world.n_combinations("audio", "heldout")
    items, captions, targets = evaluation.task_items("audio", 3 * n_audio, seed=5)
    assert len(items) == 3 * n_audio and len(captions) == n_audio == len(set(captions))
    assert [captions[t] for t in targets.tolist()] == [item.captions[0] for item in items]
    first, again = items[0], next(i for i in items[1:] if i.captions[0] == items[0].captions[0])
    assert not np.array_equal(first.media, again.media)  # another rendering of the same combination


class CaptionOracle:
    """A perfect embedder: a text, or a world item's media, becomes the one-hot of its canonical
    caption. Media are recognised by identity, so evaluate()'s items are registered as drawn."""

    def __init__(self):
        self.canonical, self.ids = {}, {}

    def register(self, items):
        for item in items:
            self.canonical.update({id(item.media): item.captions[0], item.captions[1]: item.captions[0]})

    def _onehot(self, keys):
        captions = [self.canonical.get(k, k) for k in keys]
        return torch.nn.functional.one_hot(torch.tensor([self.ids.setdefault(c, len(self.ids)) for c in captions]),
                                           512).float()

    def embed_texts(self, texts):
        return self._onehot(texts)

    def embed_images(self, media):
        return self._onehot([id(m) for m in media])

    embed_videos = embed_audios = embed_images


def test_oracle_scores_perfect_and_chance_uses_candidates(monkeypatch):
    oracle, draw = CaptionOracle(), evaluation.task_items

    def draw_and_register(modality, n, seed, split="heldout", script="latin"):
        items, captions, targets = draw(modality, n, seed, split, script)
        oracle.register(items)
        return items, captions, targets

    monkeypatch.setattr(evaluation, "task_items", draw_and_register)
    results = evaluation.evaluate(oracle, n=40, seed=3)
    for task, scores in results.items():
        assert scores["R@1"] == 1.0 and scores["n"] == 40, task
    n_audio = world.n_combinations("audio", "heldout")
    assert results["audio->text"]["candidates"] == n_audio < 40
    audio_row = next(line for line in evaluation.format_table({"oracle": results}).splitlines() if "audio" in line)
    assert audio_row.split()[-1] == f"{100 / n_audio:.1f}"

    # the training split: other combinations, the same perfect scores, every attribute right
    results = evaluation.evaluate(oracle, n=40, seed=3, split="train", attributes=True)
    assert all(scores["R@1"] == 1.0 for scores in results.values())
    assert results["audio->text"]["candidates"] == 40  # more training combinations than queries: all distinct
    assert {k: v for k, v in results["audio->text"].items() if k in ("pitch", "timbre", "contour", "rhythm")} == {
        "pitch": 1.0, "timbre": 1.0, "contour": 1.0, "rhythm": 1.0}


def test_attribute_accuracy_counts_each_attribute_of_the_top_caption():
    items, captions, targets = evaluation.task_items("audio", 12, seed=0)
    # rank for every item the caption of the next item: right exactly where their attributes agree
    top = torch.tensor([targets[(i + 1) % len(items)] for i in range(len(items))])
    result = evaluation.attribute_accuracy(items, captions, top)
    for name in ("pitch", "timbre", "contour", "rhythm"):
        expected = np.mean([items[i].attributes[name] == items[(i + 1) % 12].attributes[name] for i in range(12)])
        assert result[name] == pytest.approx(expected)
    assert evaluation.attribute_accuracy(items, captions, targets) == {k: 1.0 for k in result}


def test_captioning_probe_ranks_by_likelihood(monkeypatch):
    """With a fake likelihood that knows the answer, the probe scores 100%; with one that
    always prefers the first caption it scores exactly the share of items whose caption that is."""
    def oracle_nll(model, processor, item_input, captions):
        truth = next(i for i in drawn if i.media is item_input["audio"]).captions[0]
        return torch.tensor([0.0 if c == truth else 1.0 for c in captions])

    draw = evaluation.task_items

    def remember(modality, n, seed, split="heldout", script="latin"):
        items, captions, targets = draw(modality, n, seed, split, script)
        drawn[:] = items
        return items, captions, targets

    drawn = []
    monkeypatch.setattr(evaluation, "task_items", remember)
    monkeypatch.setattr(evaluation, "caption_nll", oracle_nll)
    result = evaluation.captioning(None, None, "audio", n=30, seed=2)
    assert result["R@1"] == 1.0 and result["n"] == 30 and result["candidates"] == world.n_combinations("audio", "heldout")
    assert all(result[name] == 1.0 for name in ("pitch", "timbre", "contour", "rhythm"))

    monkeypatch.setattr(evaluation, "caption_nll", lambda m, p, item, captions: torch.arange(len(captions)).float())
    result = evaluation.captioning(None, None, "audio", n=30, seed=2)
    first = drawn[0].attributes
    assert result["R@1"] == sum(i.captions[0] == drawn[0].captions[0] for i in drawn) / 30
    assert result["pitch"] == sum(i.attributes["pitch"] == first["pitch"] for i in drawn) / 30


def test_captioning_probe_on_a_tiny_model_and_cli_errors(tmp_path, capsys):
    from lco_mini import backbone
    from lco_mini.tiny import model as tiny
    folder = tiny.build_tiny(tmp_path / "m", **tiny.SIZES["smoke"])
    model, processor = backbone.load(folder, device="cpu")
    result = evaluation.captioning(model, processor, "audio", n=3, seed=0)
    assert result["candidates"] == 3
    # R@1 is the share of items whose own caption has the lowest total cross-entropy, computed here
    # with the model's own loss (mean over answer tokens x their count)
    items, captions, targets = evaluation.task_items("audio", 3, 0)
    right = 0
    for item, target in zip(items, targets):
        totals = []
        for caption in captions:
            batch = backbone.build_inputs(processor, [{"audio": item.media, "instruction": tasks.DESCRIBE["audio"]}],
                                          targets=[caption])
            labels = batch.pop("labels")
            with torch.no_grad():
                totals.append(model(**batch, labels=labels).loss.item() * (labels != -100).sum().item())
        right += min(range(len(captions)), key=totals.__getitem__) == target
    assert result["R@1"] == pytest.approx(right / 3)
    # the NLL is the real one: it matches a direct cross-entropy on one caption
    item = evaluation.task_items("audio", 1, 0)[0][0]
    nll = evaluation.caption_nll(model, processor, {"audio": item.media, "instruction": "Describe the above audio."},
                                 [item.captions[0]])
    batch = backbone.build_inputs(processor, [{"audio": item.media, "instruction": "Describe the above audio."}],
                                  targets=[item.captions[0]])
    labels = batch.pop("labels")
    with torch.no_grad():
        loss = model(**batch, labels=labels).loss  # mean over answer tokens
    assert torch.allclose(nll / (labels != -100).sum(), loss, atol=1e-5)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        evaluation.main([str(tmp_path / "missing")])
    assert exit_info.value.code == 2 and "cannot load" in capsys.readouterr().err
    evaluation.main([str(folder), "--n", "3", "--split", "train", "--attributes", "--device", "cpu"])
    printed = capsys.readouterr().out
    assert "(train)" in printed and "audio->text" in printed
    assert next(l for l in printed.splitlines() if l.startswith("audio->text") and "right on" in l).count("%") == 4
