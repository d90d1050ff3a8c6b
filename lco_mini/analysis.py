"""Measuring embeddings: retrieval metrics (more analyses join this module later).

Retrieval is how an embedding model is used: a query vector is compared with every
candidate vector by cosine similarity (a dot product, since embeddings are
L2-normalised) and the candidates are ranked. Recall@k is the fraction of queries
whose correct candidate is among the k best.
"""
from __future__ import annotations

import torch


def similarity(queries: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Cosine similarity matrix [Q, C] of two sets of L2-normalised embeddings."""
    if queries.ndim != 2 or candidates.ndim != 2 or queries.shape[1] != candidates.shape[1]:
        raise ValueError(f"expected [Q, D] and [C, D], got {tuple(queries.shape)} and {tuple(candidates.shape)}")
    return queries.float() @ candidates.float().T


def recall_at_k(queries: torch.Tensor, candidates: torch.Tensor, targets: torch.Tensor,
                ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Recall@k for each k: query i is correct when candidate targets[i] ranks in its top k.

    Ties are broken pessimistically (a candidate scoring exactly as high as the target
    counts as ranked above it), so a collapsed model that maps everything to one vector
    scores 0 rather than a lucky 1.
    """
    scores = similarity(queries, candidates)
    target_scores = scores.gather(1, targets.view(-1, 1))
    others = scores.clone()
    others.scatter_(1, targets.view(-1, 1), float("-inf"))
    rank = (others >= target_scores).sum(dim=1)  # candidates at least as good as the target
    return {f"R@{k}": (rank < k).double().mean().item() for k in ks}
