"""Retrieval metrics against a slow, obviously-correct implementation."""
import torch
import torch.nn.functional as F

from lco_mini.analysis import recall_at_k


def slow_recall(q, c, targets, k):
    hits = 0
    for i in range(len(q)):
        scores = [(float(q[i] @ c[j]), j) for j in range(len(c))]
        target_score = float(q[i] @ c[targets[i]])
        better_or_equal = sum(1 for s, j in scores if j != targets[i] and s >= target_score)
        hits += better_or_equal < k
    return hits / len(q)


def test_recall_matches_slow_reference():
    torch.manual_seed(0)
    q, c = F.normalize(torch.randn(37, 16), dim=1), F.normalize(torch.randn(53, 16), dim=1)
    targets = torch.randint(0, 53, (37,))
    got = recall_at_k(q, c, targets, ks=(1, 5, 10))
    for k in (1, 5, 10):
        assert abs(got[f"R@{k}"] - slow_recall(q, c, targets, k)) < 1e-9


def test_worked_example_and_ties():
    c = torch.eye(3)
    q = torch.tensor([[1.0, 0, 0], [0, 0, 1.0], [0.6, 0.8, 0]])
    got = recall_at_k(q, c, torch.tensor([0, 1, 0]), ks=(1, 2))
    # query 0 hits; query 1 ranks its target behind candidate 2 (and ties candidate 0 at 0);
    # query 2 prefers candidate 1 (0.8) over its target 0 (0.6)
    assert got == {"R@1": 1 / 3, "R@2": 2 / 3}
    collapsed = recall_at_k(torch.ones(4, 2), torch.ones(4, 2), torch.arange(4), ks=(1,))
    assert collapsed["R@1"] == 0.0  # identical vectors must not score by luck
