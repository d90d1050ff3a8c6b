"""Measuring embeddings: retrieval metrics, and the geometry that explains why LCO-Emb works.

Retrieval is how an embedding model is used: a query vector is compared with every
candidate vector by cosine similarity (a dot product, since embeddings are
L2-normalised) and the candidates are ranked. Recall@k is the fraction of queries
whose correct candidate is among the k best.

Why text-only training reaches other modalities is measured on the geometry of the
embeddings (the paper's analysis; analyze.py runs it per layer and per modality):
  anisotropy(x)        how narrow a cone one modality's embeddings occupy
  mutual_knn(a, b)     do images and their captions have the same neighbours?
  cka(a, b), cknna     kernel alignment, globally and restricted to neighbours
  permutation_null     what those scores are with the pairing shuffled
And the Generation-Representation Scaling Law (GRSL), across models of rising generative ability:
  grsl_fit(gen, rep)   Pearson, Spearman and a least-squares line, with bootstrap intervals
  mean_interval(v)     a bootstrap interval of a mean score (analyze.py continual)
Tensors in, numbers out: no model code here.
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
    rank = target_ranks(queries, candidates, targets)
    return {f"R@{k}": (rank < k).double().mean().item() for k in ks}


def target_ranks(queries: torch.Tensor, candidates: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """0-based rank of each query's target among the candidates, ties broken pessimistically."""
    scores = similarity(queries, candidates)
    target_scores = scores.gather(1, targets.view(-1, 1))
    others = scores.clone()
    others.scatter_(1, targets.view(-1, 1), float("-inf"))
    return (others >= target_scores).sum(dim=1)  # candidates at least as good as the target


def mean_reciprocal_rank(queries: torch.Tensor, candidates: torch.Tensor, targets: torch.Tensor) -> float:
    """The mean of 1 / (1-based rank of the target); ties pessimistic, as in recall_at_k."""
    return (1.0 / (target_ranks(queries, candidates, targets) + 1).double()).mean().item()


# ----------------------------------------------------------------------------- why it works: geometry
# The measures below follow LCO-Embedding's Analysis/ scripts and platonic-rep's metrics.py
# (Huh et al. 2024, "The Platonic Representation Hypothesis"). Each takes [N, D] tensors and
# computes in float64: a before/after difference of 0.01 must not be rounding.

def _rows(x: torch.Tensor, name: str = "x", min_rows: int = 2) -> torch.Tensor:
    if not torch.is_tensor(x) or x.ndim != 2:
        raise ValueError(f"{name}: expected a [N, D] tensor, got {getattr(x, 'shape', type(x).__name__)}")
    if x.shape[0] < min_rows:
        raise ValueError(f"{name}: needs at least {min_rows} rows, got {x.shape[0]}")
    x = x.detach().double()
    if not torch.isfinite(x).all():
        raise ValueError(f"{name}: holds NaN or inf")
    return x


def _paired(a: torch.Tensor, b: torch.Tensor, min_rows: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = _rows(a, "a", min_rows), _rows(b, "b", min_rows)
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"a and b must describe the same items row by row; got {a.shape[0]} and {b.shape[0]} rows")
    return a, b


def _cosine(x: torch.Tensor) -> torch.Tensor:
    norms = x.norm(dim=1, keepdim=True)
    if (norms == 0).any():
        raise ValueError("a row is all zeros: its cosine similarity is undefined")
    u = x / norms
    return u @ u.T


def anisotropy(x: torch.Tensor) -> float:
    """Mean cosine similarity over distinct pairs:  1 / (N (N - 1)) * sum_{i != j} cos(x_i, x_j).

    0 for directions spread evenly (e.g. orthogonal rows), 1 when every row points the same way:
    how much one modality's embeddings crowd into a narrow cone. The diagonal (cos = 1) is
    excluded by subtracting it exactly; LCO-Embedding's script instead divides by the number
    of non-zero similarities, which is wrong whenever a similarity is exactly 0."""
    x = _rows(x)
    s = _cosine(x)
    n = x.shape[0]
    return ((s.sum() - s.diagonal().sum()) / (n * (n - 1))).item()


def _neighbours(kernel: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """[N, N] 0/1 mask: row i marks the k largest kernel[i, j], j != i.

    Ties are broken at random (seeded): identical embeddings have no meaningful order, and an
    index order shared by both sides would make their neighbourhoods agree by luck. A tie is
    equal to 10 significant digits: the products of identical rows differ in the last bits
    from column to column (BLAS blocking), and that noise is the same on both sides."""
    n = kernel.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"k must be between 1 and N - 1 = {n - 1}, got {k}")
    shuffle = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    scale = kernel.abs().max().clamp_min(torch.finfo(kernel.dtype).tiny)
    scores = torch.round(kernel / scale, decimals=10).fill_diagonal_(float("-inf"))[:, shuffle]
    top = shuffle[torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]]
    return torch.zeros(n, n, dtype=kernel.dtype).scatter_(1, top, 1.0)


def mutual_knn(a: torch.Tensor, b: torch.Tensor, k: int = 10, seed: int = 0) -> float:
    """Mutual k-nearest-neighbour alignment:  mean_i |N_a(i) ∩ N_b(i)| / k.

    Row i of a and row i of b describe the same item (an image and its caption). N_a(i) is
    the set of the k rows of a closest to a_i by cosine, i itself excluded. 1: both spaces
    agree on every item's neighbours; a random pairing scores about k / (N - 1)."""
    a, b = _paired(a, b)
    overlap = _neighbours(_cosine(a), k, seed) * _neighbours(_cosine(b), k, seed + 1)
    return (overlap.sum(1) / k).mean().item()


def hsic(K: torch.Tensor, L: torch.Tensor, unbiased: bool = False) -> torch.Tensor:
    """Hilbert-Schmidt independence criterion of two [N, N] kernel matrices.

    biased:   trace(K H L H) / (N - 1)^2, H = I - 11^T / N (centring).
    unbiased: Song et al. 2012, eq. 5, with K~, L~ = K, L with zero diagonals:
              [tr(K~ L~) + 1^T K~ 1 * 1^T L~ 1 / ((N-1)(N-2)) - 2 / (N-2) * 1^T K~ L~ 1] / (N (N-3)),
              the U-statistic over distinct index quadruples; it needs N >= 4."""
    n = K.shape[0]
    if not unbiased:
        H = torch.eye(n, dtype=K.dtype) - 1.0 / n
        return torch.trace(K @ H @ L @ H) / (n - 1) ** 2
    if n < 4:
        raise ValueError(f"unbiased HSIC needs at least 4 rows, got {n}")
    K, L = K.clone().fill_diagonal_(0), L.clone().fill_diagonal_(0)
    return ((K * L.T).sum() + K.sum() * L.sum() / ((n - 1) * (n - 2))
            - 2 * (K @ L).sum() / (n - 2)) / (n * (n - 3))


def _constant(x: torch.Tensor) -> bool:
    """True when every row is the same vector, up to float64 rounding."""
    return bool((x - x.mean(0)).abs().max() <= 1e-12 * x.abs().max())


def _kernel_alignment(kl: torch.Tensor, kk: torch.Tensor, ll: torch.Tensor) -> float:
    """kl / sqrt(kk * ll), with no epsilon: NaN when the denominator is not positive.

    platonic-rep adds 1e-6 to this denominator. On raw MLLM states, which are strongly
    anisotropic, kk and ll are tiny after centring, so the epsilon deflates the score badly,
    and by an amount that changes when contrastive learning changes the anisotropy: a
    before/after comparison would measure the epsilon. The callers return NaN up front for a
    side without variance (identical embeddings, e.g. layer 0, where every item ends in the
    same token): there is no alignment to measure, and 0 would claim one was measured."""
    denominator = kk * ll
    if denominator <= 0:  # the unbiased estimate can dip below 0 on near-constant kernels
        return float("nan")
    return (kl / denominator.sqrt()).item()


def cka(a: torch.Tensor, b: torch.Tensor, unbiased: bool = False) -> float:
    """Linear centred kernel alignment:  HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)), K = a a^T, L = b b^T.

    1 when b is a rotation (or isotropic scaling) of a; NaN when a or b has identical rows.
    unbiased=True uses Song et al.'s estimator, whose value does not drift upward with small N
    (see hsic). Both HSICs are unchanged when one vector is subtracted from every row, so the
    rows are centred first: the same value, without cancelling the large shared offset of
    anisotropic states in float arithmetic."""
    a, b = _paired(a, b, 4 if unbiased else 2)
    if _constant(a) or _constant(b):
        return float("nan")
    a, b = a - a.mean(0), b - b.mean(0)
    K, L = a @ a.T, b @ b.T
    return _kernel_alignment(hsic(K, L, unbiased), hsic(K, K, unbiased), hsic(L, L, unbiased))


def cknna(a: torch.Tensor, b: torch.Tensor, k: int = 10, seed: int = 0) -> float:
    """CKA restricted to mutual k-nearest neighbours (Huh et al. 2024).

    With K = a a^T, L = b b^T and M_K, M_L the k-nearest-neighbour masks of their rows (self
    excluded), M = M_K * M_L keeps the pairs that are neighbours in both spaces; then
    CKNNA = HSIC_u(M K, M L) / sqrt(HSIC_u(M_K K, M_K K) HSIC_u(M_L L, M_L L)), unbiased HSIC.
    Only local structure counts, as in mutual kNN, but weighted by the kernel values.
    With k = N - 1 every pair is kept and CKNNA equals unbiased CKA. NaN for identical rows."""
    a, b = _paired(a, b, 4)
    if _constant(a) or _constant(b):
        return float("nan")
    K, L = a @ a.T, b @ b.T
    mask_k, mask_l = _neighbours(K, k, seed), _neighbours(L, k, seed + 1)
    mask = mask_k * mask_l
    return _kernel_alignment(hsic(mask * K, mask * L, True), hsic(mask_k * K, mask_k * K, True),
                             hsic(mask_l * L, mask_l * L, True))


def permutation_null(score_fn, a: torch.Tensor, b: torch.Tensor, n: int = 20, seed: int = 0) -> tuple[float, float]:
    """(mean, std) of score_fn(a, b[perm]) over n random pairings.

    What an alignment score is worth without the pairing: raw scores grow with dimension and
    anisotropy, so a number means something only next to this null."""
    if n < 2:
        raise ValueError(f"a permutation null needs n >= 2 shuffles, got {n}")
    _paired(a, b)
    generator = torch.Generator().manual_seed(seed)
    scores = torch.tensor([score_fn(a, b[torch.randperm(len(b), generator=generator)]) for _ in range(n)],
                          dtype=torch.float64)
    return scores.mean().item(), scores.std().item()


# ----------------------------------------------------------------------------- GRSL: the fit
# The paper's law: the better an MLLM generates, the better it represents after the same text-only
# CL. analyze.py grsl measures both on a ladder of models ("rungs"); the fit below says how strongly
# and how surely they go together. Scores are per query (1 = right, 0 = wrong, or any number), so
# the bootstrap can resample the queries.

def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks along the last dimension, ties sharing their mean rank (Spearman's convention):
    rank(x_i) = 1 + #(x_j < x_i) + (#(x_j == x_i) - 1) / 2."""
    below = (x.unsqueeze(-1) > x.unsqueeze(-2)).sum(-1).to(x.dtype)
    equal = (x.unsqueeze(-1) == x.unsqueeze(-2)).sum(-1).to(x.dtype)
    return 1 + below + (equal - 1) / 2


def pearson(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pearson correlation along the last dimension; NaN where x or y is constant (undefined)."""
    dx, dy = x - x.mean(-1, keepdim=True), y - y.mean(-1, keepdim=True)
    denominator = ((dx * dx).sum(-1) * (dy * dy).sum(-1)).sqrt()
    r = (dx * dy).sum(-1) / denominator
    return torch.where(denominator > 1e-12, r, torch.full_like(r, float("nan")))


def spearman(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Spearman's rank correlation: Pearson of the average ranks."""
    return pearson(average_ranks(x), average_ranks(y))


def slope(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Least-squares slope of y on x, cov(x, y) / var(x); NaN where x is constant."""
    dx, dy = x - x.mean(-1, keepdim=True), y - y.mean(-1, keepdim=True)
    var = (dx * dx).sum(-1)
    b = (dx * dy).sum(-1) / var
    return torch.where(var > 1e-12, b, torch.full_like(b, float("nan")))


def _interval(values: torch.Tensor, level: float) -> list[float] | None:
    """Percentile interval of the defined bootstrap values; None when most replicates were undefined."""
    defined = values[~values.isnan()]
    if len(defined) < len(values) / 2:
        return None
    tail = (1 - level) / 2
    return [torch.quantile(defined, tail).item(), torch.quantile(defined, 1 - tail).item()]


def grsl_fit(gen: torch.Tensor, rep: torch.Tensor, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """How representation follows generation over R rungs of a ladder of models.

    gen: [R, Qg] per-query generation scores (e.g. 1 when the captioning probe's top caption is
    right), rep: [R, Qr] per-query representation scores (e.g. 1 when a query's caption ranks
    first after CL). Row r is rung r; column q is the same held-out query on every rung. The
    points are the row means; the fit gives Pearson r, Spearman rho, and the least-squares line
    rep = intercept + slope * gen.

    The intervals are percentile bootstraps over QUERIES: each replicate redraws Qg generation and
    Qr representation queries with replacement (one draw shared by all rungs, since a query is the
    same item everywhere), recomputes the points and the statistics. So they say how much the
    result depends on which held-out items were asked (evaluation noise), not how it would vary
    with another training seed: that takes more runs. A replicate whose points are constant on
    one axis has no correlation; the interval is over the defined replicates ("undefined" counts
    the others), and None when more than half are undefined or the statistic itself is. Draw order, for a reference
    implementation: torch.randint(Qg, (n_boot, Qg)), then torch.randint(Qr, (n_boot, Qr)), from
    one generator seeded with `seed`."""
    gen, rep = gen.detach().double(), rep.detach().double()
    if gen.ndim != 2 or rep.ndim != 2 or gen.shape[0] != rep.shape[0]:
        raise ValueError(f"expected [R, Qg] and [R, Qr] with the same R rungs, got {tuple(gen.shape)} and {tuple(rep.shape)}")
    if gen.shape[0] < 3:
        raise ValueError(f"a fit needs at least 3 rungs, got {gen.shape[0]}")
    if gen.shape[1] < 1 or rep.shape[1] < 1 or not (torch.isfinite(gen).all() and torch.isfinite(rep).all()):
        raise ValueError("every rung needs at least one finite score per axis")
    x, y = gen.mean(1), rep.mean(1)
    b = slope(x, y).item()
    fit = {"rungs": gen.shape[0], "generation": x.tolist(), "representation": y.tolist(),
           "pearson": pearson(x, y).item(), "spearman": spearman(x, y).item(), "slope": b,
           "intercept": (y.mean() - b * x.mean()).item(), "n_boot": n_boot, "level": level}
    generator = torch.Generator().manual_seed(seed)
    gen_draws = torch.randint(gen.shape[1], (n_boot, gen.shape[1]), generator=generator)
    rep_draws = torch.randint(rep.shape[1], (n_boot, rep.shape[1]), generator=generator)
    xs, ys = gen[:, gen_draws].mean(-1).T, rep[:, rep_draws].mean(-1).T  # [n_boot, R]
    stats = {"pearson": pearson(xs, ys), "spearman": spearman(xs, ys), "slope": slope(xs, ys)}
    for name, values in stats.items():  # no interval around a point that is itself undefined
        fit[name + "_ci"] = None if fit[name] != fit[name] else _interval(values, level)
    fit["undefined"] = int(stats["pearson"].isnan().sum())
    return {k: (None if isinstance(v, float) and v != v else v) for k, v in fit.items()}  # NaN -> None (JSON null)


def mean_interval(values: torch.Tensor, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> list[float]:
    """Percentile bootstrap interval of the mean of per-query scores (1/0 hits, or the paired
    differences of two models on the same queries): how much the mean depends on which held-out
    queries were asked. Draw order, for a reference: torch.randint(Q, (n_boot, Q)) from one
    generator seeded with `seed`."""
    values = torch.as_tensor(values).detach().double().flatten()
    if len(values) == 0 or not torch.isfinite(values).all():
        raise ValueError(f"mean_interval: expected one or more finite scores, got {values.tolist()[:8]}")
    generator = torch.Generator().manual_seed(seed)
    draws = torch.randint(len(values), (n_boot, len(values)), generator=generator)
    return _interval(values[draws].mean(1), level)
