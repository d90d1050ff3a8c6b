"""Tests for lco_mini.infonce (InfoNCE: reference, chunked, Triton) and lco_mini.pooling (reference, Triton), and
for the GPU report of bench.kernels, run as a dry run on CPU from the command line.

Every path is checked against an authority: the reference InfoNCE is F.cross_entropy over materialised
logits (and a worked example by hand); the reference pooling is checked against a plain Python loop.

Triton's CPU interpreter is switched on by TRITON_INTERPRET=1 only if it is set before triton is first
imported, so the Triton tests (every test whose name contains "triton") run in a child pytest started
with that variable; in this session they are not even defined. Running the whole file with
TRITON_INTERPRET=1 set in the shell also works: then everything runs in one session.
"""
import csv
import math
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from lco_mini import infonce as K
from bench import measure as M
from lco_mini import pooling as P
from lco_mini import triton_support as TS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRITON_SESSION = TS.triton is not None and TS.triton_interprets()  # is Triton's interpreter on in this process?
CPU = torch.device("cpu")


def embeddings(B, M, D, dtype=torch.float32, seed=0):
    """Unit-norm anchors [B, D], positives [B, D], negatives [M, D] (None when M = 0), as leaves."""
    gen = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(2 * B + M, D, generator=gen), dim=-1).to(dtype)
    a, p, n = (t.clone().requires_grad_() for t in (x[:B], x[B:2 * B], x[2 * B:]))
    return a, p, (n if M else None)


def loss_and_grads(fn, a, p, n, **kwargs):
    leaves = [t for t in (a, p, n) if t is not None]
    for t in leaves:
        t.grad = None
    loss = fn(a, p, n, **kwargs)
    loss.backward()
    return loss.detach(), [t.grad.clone() for t in leaves]


def assert_same(result, expected, atol=1e-5, rtol=1e-5):
    (loss, grads), (ref_loss, ref_grads) = result, expected
    torch.testing.assert_close(loss.float(), ref_loss.float(), atol=atol, rtol=rtol)
    assert len(grads) == len(ref_grads)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.float(), r.float(), atol=atol, rtol=rtol)


def worked_example(fn):
    """B = 2, D = 2, a = p = I, tau = 0.5: logits = 2 I, so loss = log(e^2 + 1) - 2 and
    P - Y = [[-s, s], [s, -s]] with s = 1 / (e^2 + 1); d a = (P - Y) p / (B tau) = P - Y, d p = (P - Y)^T a."""
    a = torch.eye(2, requires_grad=True)
    p = torch.eye(2, requires_grad=True)
    loss = fn(a, p, None, temperature=0.5)
    loss.backward()
    s = 1 / (math.e ** 2 + 1)
    expected_grad = torch.tensor([[-s, s], [s, -s]])
    assert loss.item() == pytest.approx(math.log(math.e ** 2 + 1) - 2, abs=1e-6)
    torch.testing.assert_close(a.grad, expected_grad, atol=1e-6, rtol=0)
    torch.testing.assert_close(p.grad, expected_grad.T, atol=1e-6, rtol=0)


SHAPES = [(37, 0, 53), (37, 37, 53), (37, 111, 53)]  # odd on purpose: no tile divides anything


# ----------------------------------------------------------------------------- InfoNCE, PyTorch paths

def test_reference_worked_example():
    worked_example(K.infonce_reference)


def test_chunked_worked_example():
    worked_example(K.infonce_chunked)


def test_reference_is_cross_entropy_of_the_logits():
    a, p, n = embeddings(5, 7, 3)
    logits = a @ torch.cat([p, n]).T / 0.03
    expected = torch.stack([torch.logsumexp(logits[i], 0) - logits[i, i] for i in range(5)]).mean()
    assert K.infonce_reference(a, p, n).item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("B, M, D", SHAPES)
@pytest.mark.parametrize("block", [16, 1024])
def test_chunked_matches_reference(B, M, D, block):
    a, p, n = embeddings(B, M, D)
    assert_same(loss_and_grads(K.infonce_chunked, a, p, n, block=block), loss_and_grads(K.infonce_reference, a, p, n))


@pytest.mark.parametrize("temperature", [0.01, 0.07, 1.0])
def test_chunked_matches_reference_at_other_temperatures(temperature):
    a, p, n = embeddings(37, 37, 53, seed=1)
    assert_same(loss_and_grads(K.infonce_chunked, a, p, n, temperature=temperature, block=16),
                loss_and_grads(K.infonce_reference, a, p, n, temperature=temperature), atol=2e-5)


def test_chunked_with_duplicate_rows():
    """Repeated anchors and candidates (ties in every row) change nothing about the label handling."""
    a, p, n = embeddings(8, 8, 16, seed=2)
    a, p, n = (t.detach() for t in (a, p, n))
    a, p = torch.cat([a[:4], a[:4]]), torch.cat([p[:4], p[:4]])
    n = torch.cat([p[:4], n[:4]])  # negatives that equal positives
    a, p, n = (t.clone().requires_grad_() for t in (a, p, n))
    result = loss_and_grads(K.infonce_chunked, a, p, n, block=4)
    assert_same(result, loss_and_grads(K.infonce_reference, a, p, n))
    # anchors 0 and 4 are the same vector facing the same candidates, so their gradients are equal
    torch.testing.assert_close(result[1][0][0], result[1][0][4])


def test_chunked_bf16_inputs_against_fp32_reference():
    a, p, n = embeddings(37, 111, 53, dtype=torch.bfloat16, seed=3)
    loss, grads = loss_and_grads(K.infonce_chunked, a, p, n, block=16)
    assert all(g.dtype == torch.bfloat16 for g in grads)
    a32, p32, n32 = (t.detach().float().requires_grad_() for t in (a, p, n))
    ref_loss, ref_grads = loss_and_grads(K.infonce_reference, a32, p32, n32)
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(ref_loss.item(), abs=1e-4)  # fp32 accumulation
    for g, r in zip(grads, ref_grads):
        assert (g.float() - r).abs().max() <= 1e-2 * r.abs().max()  # bf16 rounding of the returned gradient


def test_chunked_gradcheck_float64():
    a, p, n = (t.detach().double().requires_grad_() for t in embeddings(4, 3, 5, seed=4))
    assert torch.autograd.gradcheck(lambda a, p, n: K.infonce_chunked(a, p, n, temperature=0.5, block=2), (a, p, n))


def test_chunked_loss_never_materialises_the_logits():
    """Peak resident memory of forward + backward (measured by the kernel, see M.peak_rss_bytes): the
    reference must show the B x N fp32 logits, the chunked path only a few block x block tiles."""
    B = N = 8192
    logits_bytes = B * N * 4  # 256 MiB
    a, p, _ = embeddings(B, 0, 16, seed=5)

    def run(fn, **kwargs):
        a.grad = p.grad = None
        fn(a, p, **kwargs).backward()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # steadier on a shared machine: no oversubscribed thread pool
    try:
        run(K.infonce_chunked)  # warm-up: first allocations
        small_tiles = M.peak_rss_bytes(lambda: run(K.infonce_chunked, block=256))  # a few 256 KiB tiles
        default_tiles = M.peak_rss_bytes(lambda: run(K.infonce_chunked))  # 4 MiB tiles (+ allocator slack)
        reference = M.peak_rss_bytes(lambda: run(K.infonce_reference))
    finally:
        torch.set_num_threads(threads)
    assert reference > logits_bytes, f"the measurement missed the reference's logits: {reference / 2**20:.0f} MiB"
    assert small_tiles < logits_bytes / 16, f"chunked path (block 256) peaked at {small_tiles / 2**20:.0f} MiB"
    assert default_tiles < logits_bytes / 4, f"chunked path (block 1024) peaked at {default_tiles / 2**20:.0f} MiB"


@pytest.mark.parametrize("args, error, match", [
    ((torch.zeros(3, 4), torch.zeros(3, 5)), ValueError, "same|both"),
    ((torch.zeros(3, 4), torch.zeros(2, 4)), ValueError, r"\[B, D\]"),
    ((torch.zeros(0, 4), torch.zeros(0, 4)), ValueError, "B >= 1"),
    ((torch.zeros(3, 4), torch.zeros(3, 4), torch.zeros(5, 3)), ValueError, "negative"),
    ((torch.zeros(3, 4), torch.zeros(3, 4, dtype=torch.float64)), TypeError, "dtype"),
    ((torch.zeros(3, 4, dtype=torch.long), torch.zeros(3, 4, dtype=torch.long)), TypeError, "floating"),
    ((torch.zeros(3, 4), torch.zeros(3, 4), None, 0.0), ValueError, "temperature"),
    ((torch.zeros(3, 4), torch.zeros(3, 4), None, -1.0), ValueError, "temperature"),
])
def test_infonce_rejects_bad_inputs(args, error, match):
    with pytest.raises(error, match=match):
        K.infonce(*args)


def test_infonce_rejects_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        K.infonce(torch.zeros(2, 3), torch.zeros(2, 3), backend="cuda")


def test_auto_backend_on_cpu_is_chunked_and_says_so_once(capsys):
    a, p, n = embeddings(5, 5, 8)
    TS._announced.clear()
    loss = K.infonce(a, p, n)
    K.infonce(a, p, n)
    lines = [line for line in capsys.readouterr().err.splitlines() if "lco_mini.kernels" in line]
    assert lines == ["lco_mini.kernels: infonce uses the chunked path (tensors on cpu)"]
    assert loss.item() == pytest.approx(K.infonce_reference(a, p, n).item(), abs=1e-5)


@pytest.mark.parametrize("B, N, D, size", [(65536, 65536, 1024, 2), (4096, 32768, 4096, 2), (1024, 8192, 1024, 2),
                                           (37, 148, 53, 4), (300, 2400, 1100, 4), (10**6, 2 * 10**6, 16, 2)])
def test_backward_chunk_keeps_the_extra_memory_at_the_embeddings_size(B, N, D, size):
    R = K._chunk_rows(B, N, D, size)
    budget = max((B + N) * D * size, 64 * 2**20)
    assert 1 <= R <= B and (R == B or R % 64 == 0)
    assert R * N * size <= budget or R == 64, (R, R * N * size / 2**20)  # 64 rows is the floor (huge N, tiny D)
    assert R == B or (R + 64) * N * size > budget  # and R is as big as the budget allows: fewer, larger matmuls
    assert K._chunk_rows(B, N, D, size, requested=16) == min(16, B)


def test_chunk_rows_at_the_largest_benchmark_shape():
    assert K._chunk_rows(65536, 65536, 1024, 2) == 2048  # G is 256 MiB, as much as a and c together


def test_gpu_report_dry_run_from_the_command_line(tmp_path):
    """`python -m bench.kernels --gpu-report DIR --dry-run`: kernels_bench restarts itself with Triton's
    interpreter and runs the report's own code (bench/gpu_report.py) with tiny shapes on CPU."""
    assert TS.triton is not None, "the report needs triton (see requirements.txt)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    env.pop("TRITON_INTERPRET", None)
    child = subprocess.run([sys.executable, "-m", "bench.kernels", "--gpu-report", str(tmp_path), "--dry-run"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, child.stdout[-4000:] + child.stderr[-4000:]
    assert sorted(os.listdir(tmp_path)) == ["cpu-dry-run.csv", "cpu-dry-run.md"]
    with open(tmp_path / "cpu-dry-run.csv") as f:
        rows = list(csv.DictReader(f))
    checks = [r for r in rows if r["section"].startswith("Correctness")]
    assert len(checks) >= 9 and all(r["result"] == "PASS" for r in checks), checks
    assert any(r["path"].endswith("R16") for r in checks)  # the backward in chunks of 16 rows: 16, 16, 5
    triton_rows = [r for r in rows if r["section"].startswith("InfoNCE") and r["provider"].startswith("triton (chunked-G")]
    assert len(triton_rows) == 2 and all(float(r["grad err"]) < 1e-5 and float(r["fwd+bwd ms"]) > 0 for r in triton_rows)
    pooling = [r for r in rows if r["section"].startswith("Pooling benchmark") and r["mode"] != "copy"]
    assert len(pooling) == 4 and all(float(r["fwd GB/s"]) > 0 and not r["note"] for r in pooling), pooling
    assert "| PASS" in (tmp_path / "cpu-dry-run.md").read_text()


# ----------------------------------------------------------------------------- pooling, PyTorch path

def pool_by_loop(hidden, mask, mode, normalize):
    """The definition, one row at a time: the attended positions, then the last of them or their mean."""
    rows = []
    for h, m in zip(hidden, mask):
        attended = [t for t in range(len(m)) if m[t] != 0]
        v = h[attended[-1]] if mode == "last" else h[attended].sum(0) / len(attended)
        rows.append(v / v.norm().clamp_min(1e-12) if normalize else v)
    return torch.stack(rows)


def padded(B, T, D, side, seed=0, dtype=torch.float32):
    """Random hidden states and an int64 mask with random lengths in [1, T]; row 0 has a single token."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    lengths[0] = 1
    positions = torch.arange(T)[None, :]
    right = positions < lengths[:, None]
    left = positions >= T - lengths[:, None]
    use_left = {"left": torch.ones(B, 1, dtype=torch.bool), "right": torch.zeros(B, 1, dtype=torch.bool),
                "mixed": torch.arange(B)[:, None] % 2 == 0}[side]
    mask = torch.where(use_left, left, right).long()
    return torch.randn(B, T, D, generator=gen).to(dtype), mask, lengths


@pytest.mark.parametrize("mode", ["last", "mean"])
@pytest.mark.parametrize("side", ["left", "right", "mixed"])
@pytest.mark.parametrize("normalize", [True, False])
def test_pool_reference_matches_the_definition(mode, side, normalize):
    hidden, mask, _ = padded(6, 11, 13, side, seed=7)
    torch.testing.assert_close(P.pool(hidden, mask, mode, normalize, backend="reference"),
                               pool_by_loop(hidden, mask, mode, normalize))


def test_last_pooling_reads_the_last_real_token_for_either_padding_side():
    hidden, mask, lengths = padded(5, 9, 4, "left", seed=8)
    torch.testing.assert_close(P.pool(hidden, mask, "last", False, backend="reference"), hidden[:, -1])
    hidden, mask, lengths = padded(5, 9, 4, "right", seed=8)
    torch.testing.assert_close(P.pool(hidden, mask, "last", False, backend="reference"), hidden[torch.arange(5), lengths - 1])


def test_pool_output_is_unit_norm_and_accepts_bool_masks():
    hidden, mask, _ = padded(4, 7, 9, "mixed", seed=9)
    out = P.pool(hidden, mask.bool(), "mean", backend="reference")
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(out, P.pool(hidden, mask, "mean", backend="reference"))


@pytest.mark.parametrize("mode", ["last", "mean"])
def test_pool_reference_gradcheck_float64(mode):
    hidden, mask, _ = padded(3, 5, 4, "mixed", seed=10, dtype=torch.float64)
    hidden.requires_grad_()
    assert torch.autograd.gradcheck(lambda h: P.pool(h, mask, mode, True, backend="reference"), (hidden,))


def test_pool_chunked_backend_means_the_reference():
    hidden, mask, _ = padded(3, 5, 4, "right", seed=11)
    torch.testing.assert_close(P.pool(hidden, mask, "mean", backend="chunked"), P.pool_reference(hidden, mask, "mean"))


@pytest.mark.parametrize("hidden, mask, mode, error, match", [
    (torch.zeros(2, 3, 4), torch.tensor([[1, 1, 0], [0, 0, 0]]), "last", ValueError, r"rows \[1\]"),
    (torch.zeros(2, 3), torch.ones(2, 3), "last", ValueError, r"\[B, T, D\]"),
    (torch.zeros(2, 3, 4), torch.ones(2, 4), "last", ValueError, "attention_mask"),
    (torch.zeros(2, 3, 4), torch.ones(2, 3), "max", ValueError, "mode"),
    (torch.zeros(2, 3, 4, dtype=torch.long), torch.ones(2, 3), "last", TypeError, "floating"),
])
def test_pool_rejects_bad_inputs(hidden, mask, mode, error, match):
    with pytest.raises(error, match=match):
        P.pool(hidden, mask, mode)


# ----------------------------------------------------------------------------- Triton (interpreter)

if not TRITON_SESSION:

    def test_triton_backend_on_cpu_without_the_interpreter_is_an_error():
        a, p, _ = embeddings(3, 0, 4)
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET|triton package"):
            K.infonce(a, p, backend="triton")
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET|triton package"):
            P.pool(torch.zeros(1, 2, 3), torch.ones(1, 2), backend="triton")

    def test_triton_kernels_in_the_interpreter():
        """Runs this file's Triton tests in a child pytest with TRITON_INTERPRET=1 (see the docstring)."""
        assert TS.triton is not None, "the Triton tests need triton (see requirements.txt)"
        env = {**os.environ, "TRITON_INTERPRET": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
        # --noconftest: these tests use none of conftest's model fixtures (its settings come in env), and
        # importing it would cost the child seconds of transformers
        child = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--noconftest",
                                os.path.abspath(__file__), "-k", "triton"], cwd=ROOT, env=env, capture_output=True,
                               text=True, timeout=600)
        summary = child.stdout.strip().splitlines()[-1] if child.stdout.strip() else ""
        assert child.returncode == 0, child.stdout[-6000:] + child.stderr[-3000:]
        passed = re.search(r"(\d+) passed", summary)
        assert passed and int(passed.group(1)) >= 24 and "failed" not in summary and "skipped" not in summary, summary

else:

    def test_triton_worked_example():
        worked_example(K.infonce_triton)

    @pytest.mark.parametrize("B, M, D", SHAPES)
    def test_triton_infonce_matches_reference(B, M, D):
        a, p, n = embeddings(B, M, D, seed=B + M)
        assert_same(loss_and_grads(K.infonce_triton, a, p, n), loss_and_grads(K.infonce_reference, a, p, n))

    def test_triton_infonce_split_loops_and_other_temperature():
        """16-wide tiles and min_programs=8 cut every kernel's loop into pieces combined afterwards."""
        a, p, n = embeddings(37, 37, 53, seed=12)
        config = K.TritonConfig(16, 16, 16, min_programs=8)
        assert_same(loss_and_grads(K.infonce_triton, a, p, n, temperature=0.07, config=config),
                    loss_and_grads(K.infonce_reference, a, p, n, temperature=0.07))

    def test_triton_infonce_with_duplicate_rows():
        a, p, _ = embeddings(20, 0, 33, seed=13)
        a, p = (torch.cat([t.detach()[:10]] * 2).requires_grad_() for t in (a, p))
        n = p.detach()[:7].clone().requires_grad_()
        assert_same(loss_and_grads(K.infonce_triton, a, p, n), loss_and_grads(K.infonce_reference, a, p, n))

    @pytest.mark.parametrize("B, M, D", SHAPES)
    def test_triton_infonce_backward_in_chunks(B, M, D):
        """chunk_rows=16 cuts the 37 anchors into chunks of 16, 16 and 5 rows: d c sums over them."""
        a, p, n = embeddings(B, M, D, seed=B + M + 1)
        config = K.TritonConfig(16, 16, 16, chunk_rows=16)
        assert_same(loss_and_grads(K.infonce_triton, a, p, n, temperature=0.05, config=config),
                    loss_and_grads(K.infonce_reference, a, p, n, temperature=0.05))

    def test_triton_infonce_gradient_of_anchors_only():
        a, p, n = embeddings(37, 37, 53, seed=19)
        p, n = p.detach(), n.detach()  # frozen candidates: the backward skips d c
        config = K.TritonConfig(16, 16, 16, chunk_rows=16)
        K.infonce_triton(a, p, n, config=config).backward()
        expected = torch.autograd.grad(K.infonce_reference(a, p, n), a)[0]
        torch.testing.assert_close(a.grad, expected, atol=1e-5, rtol=1e-5)

    def test_triton_infonce_is_bitwise_repeatable():
        a, p, n = embeddings(37, 37, 53, seed=14)
        config = K.TritonConfig(16, 16, 16, min_programs=8, chunk_rows=16)
        first = loss_and_grads(K.infonce_triton, a, p, n, config=config)
        second = loss_and_grads(K.infonce_triton, a, p, n, config=config)
        assert torch.equal(first[0], second[0]) and all(torch.equal(x, y) for x, y in zip(first[1], second[1]))

    def test_triton_infonce_equals_the_chunked_loss():
        a, p, n = embeddings(9, 4, 20, seed=15)
        assert K.infonce(a, p, n, backend="triton").item() == pytest.approx(K.infonce_chunked(a, p, n).item(), abs=1e-5)

    def pooled_and_grad(hidden, mask, mode, normalize, grad_out, backend):
        """pool's output and its gradient w.r.t. hidden for a given upstream gradient."""
        h = hidden.clone().requires_grad_()
        out = P.pool(h, mask, mode, normalize, backend=backend)
        return out.detach(), torch.autograd.grad(out, h, grad_out)[0]

    @pytest.mark.parametrize("mode", ["last", "mean"])
    @pytest.mark.parametrize("side", ["left", "right"])
    @pytest.mark.parametrize("normalize", [True, False])
    def test_triton_pool_matches_reference(mode, side, normalize):
        hidden, mask, _ = padded(5, 37, 53, side, seed=16)
        grad_out = torch.randn(5, 53, generator=torch.Generator().manual_seed(17))
        (ref, ref_grad), (out, grad) = [pooled_and_grad(hidden, mask, mode, normalize, grad_out, backend)
                                        for backend in ("reference", "triton")]
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(grad, ref_grad, atol=1e-6, rtol=1e-5)

    @pytest.mark.parametrize("mode", ["last", "mean"])
    def test_triton_pool_mask_with_holes_and_padding_on_both_sides(mode):
        """The mean sums each row's span [first, last] in pieces and weights every position by the mask,
        so holes inside the span count 0; 'last' is the last attended position, wherever it is."""
        hidden, _, _ = padded(4, 41, 37, "right", seed=20)
        mask = torch.zeros(4, 41, dtype=torch.long)
        mask[0, 3:38:2] = 1  # every other position
        mask[1, 40] = 1  # only the very last
        mask[2, 0] = 1  # only the first
        mask[3, 5:30] = 1
        mask[3, 17:21] = 0  # a gap
        grad_out = torch.randn(4, 37, generator=torch.Generator().manual_seed(21))
        (ref, ref_grad), (out, grad) = [pooled_and_grad(hidden, mask, mode, True, grad_out, backend)
                                        for backend in ("reference", "triton")]
        torch.testing.assert_close(out, pool_by_loop(hidden, mask, mode, True), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(grad, ref_grad, atol=1e-6, rtol=1e-5)

    def test_triton_pool_float64_and_bool_mask():
        hidden, mask, _ = padded(3, 17, 20, "mixed", seed=18, dtype=torch.float64)
        torch.testing.assert_close(P.pool(hidden, mask.bool(), "mean", backend="triton"), pool_by_loop(hidden, mask, "mean", True))

    def test_triton_pool_rejects_empty_rows():
        with pytest.raises(ValueError, match="no attended token"):
            P.pool(torch.zeros(2, 3, 4), torch.tensor([[0, 0, 0], [1, 0, 0]]), backend="triton")
