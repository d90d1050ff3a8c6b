"""lco_mini/tiny/tasks.py: the tiny model's batches have exactly the asked size and shares, and each is a
pure function of its seed."""
import pytest

from lco_mini.tiny import tasks


def modality_of(item: dict) -> str:
    if "text" in item:
        return "text"
    if "image" in item:  # documents are images with the reading instruction
        return "document" if item["instruction"] == tasks.DESCRIBE["document"] else "image"
    return next(k for k in ("video", "audio") if k in item)


@pytest.mark.parametrize("n", [1, 7, 32])
def test_caption_examples_have_the_mix_shares_exactly(n):
    examples = tasks.world_caption_examples(n, seed=5)
    assert len(examples) == n
    counts = {m: sum(modality_of(item) == m for item, _ in examples) for m in tasks.PRETRAIN_MIX}
    expected = {m: round(share * n) for m, share in tasks.PRETRAIN_MIX.items()}
    expected["text"] += n - sum(expected.values())  # rounding leftovers go to text
    assert counts == expected
    for item, target in examples:  # every target is one of the item's world captions or a word
        assert isinstance(target, str) and target.strip()


def test_pair_examples_have_the_multimodal_share_exactly():
    for n, ratio in ((32, 0.0), (32, 0.25), (10, 0.5), (5, 1.0)):
        triples = tasks.world_pair_examples(n, seed=3, multimodal_ratio=ratio)
        media = [a for a, _, _ in triples if "text" not in a]
        assert len(triples) == n and len(media) == round(ratio * n), (n, ratio)
        for anchor, positive, negative in triples:
            assert set(positive) == {"text"} and set(negative) == {"text"} and positive != negative


def test_batches_are_pure_functions_of_the_seed():
    key = lambda examples: [(sorted(item), target) for item, target in examples]
    assert key(tasks.world_caption_examples(16, seed=9)) == key(tasks.world_caption_examples(16, seed=9))
    assert key(tasks.world_caption_examples(16, seed=9)) != key(tasks.world_caption_examples(16, seed=10))
    assert tasks.world_pair_examples(8, 4, 0.0) == tasks.world_pair_examples(8, 4, 0.0)


def test_vl_backbones_get_no_audio_calibration_pairs():
    triples = tasks.world_pair_examples(40, seed=1, multimodal_ratio=1.0, media=("image", "video"))
    assert {next(iter(anchor)) for anchor, _, _ in triples} == {"image", "video"}
