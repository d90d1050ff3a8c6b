"""evaluation.py: held-out queries, their candidates, and recall on an oracle embedder."""
import numpy as np
import torch

from lco_mini import evaluation, world


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

    def draw_and_register(modality, n, seed):
        items, captions, targets = draw(modality, n, seed)
        oracle.register(items)
        return items, captions, targets

    monkeypatch.setattr(evaluation, "task_items", draw_and_register)
    results = evaluation.evaluate(oracle, n=40, seed=3)
    for task, scores in results.items():
        assert scores["R@1"] == 1.0 and scores["n"] == 40, task
    assert results["audio->text"]["candidates"] == world.n_combinations("audio", "heldout") == 24
    audio_row = next(line for line in evaluation.format_table({"oracle": results}).splitlines() if "audio" in line)
    assert audio_row.split()[-1] == f"{100 / 24:.1f}"
