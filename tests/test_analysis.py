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


# ----------------------------------------------------------------------------- geometry: slow references
import itertools
import math

import pytest

from lco_mini.analysis import anisotropy, cka, cknna, hsic, mutual_knn, permutation_null


def slow_cos(u, v):
    return sum(x * y for x, y in zip(u, v)) / math.sqrt(sum(x * x for x in u) * sum(y * y for y in v))


def slow_anisotropy(x):
    rows = x.tolist()
    pairs = [(i, j) for i in range(len(rows)) for j in range(len(rows)) if i != j]
    return sum(slow_cos(rows[i], rows[j]) for i, j in pairs) / len(pairs)


def slow_neighbours(x, k, kernel=slow_cos):
    rows = x.tolist()
    return [set(sorted((j for j in range(len(rows)) if j != i), key=lambda j: -kernel(rows[i], rows[j]))[:k])
            for i in range(len(rows))]


def slow_mutual_knn(a, b, k):
    na, nb = slow_neighbours(a, k), slow_neighbours(b, k)
    return sum(len(x & y) / k for x, y in zip(na, nb)) / len(na)


def slow_biased_hsic(K, L):
    """sum_ij Kc_ij Lc_ij / (n-1)^2 with Kc the double-centred kernel, entry by entry."""
    n = len(K)
    def centred(M):
        row = [sum(M[i]) / n for i in range(n)]
        col = [sum(M[i][j] for i in range(n)) / n for j in range(n)]
        total = sum(row) / n
        return [[M[i][j] - row[i] - col[j] + total for j in range(n)] for i in range(n)]
    Kc, Lc = centred(K), centred(L)
    return sum(Kc[i][j] * Lc[i][j] for i in range(n) for j in range(n)) / (n - 1) ** 2


def slow_unbiased_hsic(K, L):
    """The U-statistic itself: the mean over ordered quadruples of distinct indices of
    K_ij L_ij + K_ij L_qr - 2 K_ij L_iq (Song et al. 2012), for symmetric kernels."""
    n, total, count = len(K), 0.0, 0
    for i, j, q, r in itertools.permutations(range(n), 4):
        total += K[i][j] * L[i][j] + K[i][j] * L[q][r] - 2 * K[i][j] * L[i][q]
        count += 1
    return total / count


def slow_eq5_hsic(K, L):
    """Song et al.'s eq. 5 written as loops (holds for the asymmetric masked kernels of CKNNA)."""
    n = len(K)
    Kt = [[0.0 if i == j else K[i][j] for j in range(n)] for i in range(n)]
    Lt = [[0.0 if i == j else L[i][j] for j in range(n)] for i in range(n)]
    trace = sum(Kt[i][j] * Lt[j][i] for i in range(n) for j in range(n))
    sums = sum(map(sum, Kt)) * sum(map(sum, Lt)) / ((n - 1) * (n - 2))
    product = sum(Kt[i][m] * Lt[m][j] for i in range(n) for j in range(n) for m in range(n))
    return (trace + sums - 2 * product / (n - 2)) / (n * (n - 3))


def gram(x):
    rows = x.tolist()
    return [[sum(p * q for p, q in zip(u, v)) for v in rows] for u in rows]


def slow_cka(a, b, hsic_fn):
    K, L = gram(a), gram(b)
    return hsic_fn(K, L) / math.sqrt(hsic_fn(K, K) * hsic_fn(L, L))


def slow_cknna(a, b, k):
    K, L = gram(a), gram(b)
    dot = lambda u, v: sum(p * q for p, q in zip(u, v))
    nk, nl = slow_neighbours(a, k, dot), slow_neighbours(b, k, dot)
    n = len(K)
    masked = lambda M, sets_a, sets_b: [[M[i][j] if (j in sets_a[i] and j in sets_b[i]) else 0.0
                                         for j in range(n)] for i in range(n)]
    kl = slow_eq5_hsic(masked(K, nk, nl), masked(L, nk, nl))
    kk = slow_eq5_hsic(masked(K, nk, nk), masked(K, nk, nk))
    ll = slow_eq5_hsic(masked(L, nl, nl), masked(L, nl, nl))
    return kl / math.sqrt(kk * ll)


@pytest.fixture
def related():
    """Two tie-free views of 23 items: b is a noisy linear map of a (odd sizes on purpose)."""
    g = torch.Generator().manual_seed(3)
    a = torch.randn(23, 7, generator=g) + 0.5
    b = a @ torch.randn(7, 5, generator=g) + 0.7 * torch.randn(23, 5, generator=g)
    return a, b


def test_anisotropy_matches_loop_and_worked_cases(related):
    a, _ = related
    assert anisotropy(a) == pytest.approx(slow_anisotropy(a), abs=1e-12)
    assert anisotropy(torch.eye(6)) == 0.0  # orthogonal one-hot rows: every pair has cosine exactly 0
    assert anisotropy(torch.tensor([[1.0, 0], [1, 0], [0, 1]])) == pytest.approx(2 / 6)
    assert anisotropy(torch.ones(5, 3) * torch.arange(1, 6).view(5, 1)) == pytest.approx(1.0)  # one direction


def test_mutual_knn_matches_loop(related):
    a, b = related
    for k in (1, 3, 10):
        assert mutual_knn(a, b, k) == pytest.approx(slow_mutual_knn(a, b, k), abs=1e-12)
    assert mutual_knn(a, a, 5) == 1.0
    assert mutual_knn(a, 3 * a @ torch.linalg.qr(torch.randn(7, 7))[0], 5) == 1.0  # rotation + scale


def test_identical_rows_align_at_chance_not_by_luck():
    # every embedding equal (e.g. layer 0: the same last token for every item): no neighbour order exists
    same = torch.ones(40, 4)
    score = mutual_knn(same, same, k=10)
    assert score < 0.6  # by index order both sides would agree perfectly (1.0); random tie-breaks: ~10/39
    wide = torch.randn(1, 256, generator=torch.Generator().manual_seed(0)).expand(212, 256).contiguous()
    assert mutual_knn(wide, wide.clone(), k=10) < 0.2  # ties up to BLAS rounding noise are ties too (~0.05)
    assert math.isnan(cka(same, same)) and math.isnan(cka(same, same, unbiased=True))
    assert math.isnan(cknna(same, torch.randn(40, 4), k=10))


def test_hsic_matches_loop_definitions(related):
    a, b = related
    a, b = a[:9].double(), b[:9].double()
    K, L = a @ a.T, b @ b.T
    assert hsic(K, L).item() == pytest.approx(slow_biased_hsic(K.tolist(), L.tolist()), rel=1e-10)
    assert hsic(K, L, unbiased=True).item() == pytest.approx(slow_unbiased_hsic(K.tolist(), L.tolist()), rel=1e-9)
    M = (torch.rand(9, 9, generator=torch.Generator().manual_seed(1)) > 0.5).double()  # asymmetric
    assert hsic(M * K, M * L, unbiased=True).item() == pytest.approx(
        slow_eq5_hsic((M * K).tolist(), (M * L).tolist()), rel=1e-9)


def test_cka_matches_loop_and_worked_cases(related):
    a, b = related
    assert cka(a, b) == pytest.approx(slow_cka(a, b, slow_biased_hsic), abs=1e-10)
    assert cka(a[:8], b[:8], unbiased=True) == pytest.approx(slow_cka(a[:8], b[:8], slow_unbiased_hsic), abs=1e-9)
    rotated = 2.5 * a @ torch.linalg.qr(torch.randn(7, 7))[0]
    assert cka(a, rotated) == pytest.approx(1.0, abs=1e-9)
    assert cka(a, rotated, unbiased=True) == pytest.approx(1.0, abs=1e-9)
    assert 0.2 < cka(a, b) < 0.99  # related, but not the same geometry


def test_cka_has_no_epsilon():
    # features whose kernels vary little (as centred, strongly anisotropic states do): CKA is scale-free
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 6, generator=g, dtype=torch.float64)
    y = x @ torch.randn(6, 6, generator=g, dtype=torch.float64) + 0.1 * torch.randn(30, 6, generator=g, dtype=torch.float64)
    assert cka(1e-3 * x, 1e-3 * y) == pytest.approx(cka(x, y), abs=1e-9)
    offset = torch.full((1, 6), 100.0, dtype=torch.float64)  # a shared direction, as in anisotropic states
    assert cka(1e-2 * x + offset, 1e-2 * y + offset, unbiased=True) == pytest.approx(cka(x, y, unbiased=True), abs=1e-6)
    # with platonic-rep's +1e-6 in the denominator the small-kernel version would score far lower
    K, L = (1e-3 * x) @ (1e-3 * x).T, (1e-3 * y) @ (1e-3 * y).T
    with_eps = hsic(K, L, True) / ((hsic(K, K, True) * hsic(L, L, True)).sqrt() + 1e-6)
    assert with_eps.item() < 0.5 * cka(x, y, unbiased=True)
    assert cka(1e-3 * x, 1e-3 * y, unbiased=True) == pytest.approx(cka(x, y, unbiased=True), abs=1e-9)


def test_cknna_matches_loop_and_equals_unbiased_cka_at_full_k(related):
    a, b = related
    a, b = a[:11], b[:11]
    for k in (3, 6):
        assert cknna(a, b, k) == pytest.approx(slow_cknna(a, b, k), abs=1e-9)
    assert cknna(a, b, k=10) == pytest.approx(cka(a, b, unbiased=True), abs=1e-10)
    assert cknna(a, a, k=4) == pytest.approx(1.0, abs=1e-9)


def test_permutation_null_is_what_a_shuffle_scores():
    g = torch.Generator().manual_seed(5)
    a = torch.randn(60, 8, generator=g)
    b = a + 0.3 * torch.randn(60, 8, generator=g)
    mean, std = permutation_null(mutual_knn, a, b, n=20)
    assert mutual_knn(a, b) > 0.5 and abs(mean - 10 / 59) < 0.05 and 0 < std < 0.05
    shuffled = b[torch.randperm(60, generator=g)]
    assert abs(mutual_knn(a, shuffled) - mean) < 4 * std + 0.02  # a shuffled pairing lands on the null
    assert permutation_null(mutual_knn, a, b, n=20) == (mean, std)  # seeded


@pytest.mark.parametrize("call, match", [
    (lambda: mutual_knn(torch.randn(5, 3), torch.randn(6, 3)), "same items row by row"),
    (lambda: mutual_knn(torch.randn(5, 3), torch.randn(5, 3), k=5), "k must be between 1 and N - 1"),
    (lambda: cknna(torch.randn(8, 3), torch.randn(8, 3), k=8), "k must be between 1 and N - 1"),
    (lambda: cka(torch.randn(3, 3), torch.randn(3, 3), unbiased=True), "at least 4 rows"),
    (lambda: cknna(torch.randn(3, 3), torch.randn(3, 3), k=2), "at least 4 rows"),
    (lambda: anisotropy(torch.randn(1, 3)), "at least 2 rows"),
    (lambda: anisotropy(torch.randn(4)), r"expected a \[N, D\] tensor"),
    (lambda: anisotropy(torch.tensor([[1.0, 0], [0, 0]])), "all zeros"),
    (lambda: anisotropy(torch.tensor([[1.0, float("nan")], [0, 1]])), "NaN or inf"),
    (lambda: permutation_null(mutual_knn, torch.randn(5, 3), torch.randn(5, 3), n=1), "n >= 2"),
])
def test_bad_input_is_a_clear_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()
