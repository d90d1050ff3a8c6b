"""The InfoNCE loss of LCO-Emb: a reference, a chunked PyTorch version and Triton kernels.

THE LOSS. LCO-Emb trains with one-way InfoNCE. Anchors a [B, D], positives p [B, D] and hard
negatives n [M, D] (every anchor's negatives, flattened) give the candidates c = cat(p, n) [N, D],
N = B + M, and anchor i has to pick out candidate i among all N:

    logits[i, j] = a_i . c_j / tau                       (tau = 0.03)
    loss         = mean_i ( lse_i - logits[i, i] ),       lse_i = log sum_j exp(logits[i, j])

The gradient has a closed form. With P = softmax(logits) row by row and Y the one-hot labels,

    dloss/dlogits = (P - Y) / B,     d a = (P - Y) c / (B tau),     d c = (P - Y)^T a / (B tau)

and P[i, j] = exp(logits[i, j] - lse_i) needs nothing but the B numbers lse. So the B x N logits, the
only big thing here (16 GiB of fp32 at B = N = 65536, next to 64 MiB of embeddings at D = 256), never
have to exist at once: the forward keeps lse, the backward recomputes the logits a piece at a time.
That is FlashAttention's trick applied to a contrastive loss (as in Inf-CL and Liger's fused linear
cross-entropy).

Three implementations give the same numbers (tests/test_kernels.py checks each against the others):
  reference  three lines around F.cross_entropy; materialises the logits. The ground truth.
  chunked    a torch.autograd.Function in plain PyTorch that walks the logits block by block with an
             online log-sum-exp; memory O((B + N) D + block^2); CPU and GPU. Read this one to learn the
             algorithm.
  triton     forward: one fused kernel streams candidate tiles through an online softmax and keeps lse.
             backward ("chunked G"): for R anchor rows at a time, a kernel writes G = P - Y [R, N] in the
             input dtype, then two cuBLAS matmuls on tensor cores give d a[rows] = G c and add G^T a[rows]
             to d c. R is chosen so that G costs no more than the embeddings themselves. No atomics:
             bit-for-bit deterministic. fp32 / bf16 / fp16 inputs, fp32 accumulation.

Pooling (hidden states -> one vector per row) lives next door, in lco_mini/pooling.py; what both share
(the backend choice, Triton's interpreter, dtype rules) in lco_mini/triton_support.py.

backend="auto" takes Triton for CUDA tensors and the PyTorch path on CPU, and says once which. On CPU,
backend="triton" runs the kernels in Triton's interpreter when TRITON_INTERPRET=1 (slow; for tests).
The benchmark and the GPU report live in bench/kernels.py and bench/gpu_report.py:
    python -m bench.kernels [--big] [--gpu-report OUTDIR [--dry-run]]
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lco_mini.triton_support import TRITON_DTYPES, accumulation_dtype, choose_path, launcher, require_triton, tl, triton


# ----------------------------------------------------------------------------- checks

def _check_infonce_inputs(anchor, positive, negative, temperature):
    if anchor.dim() != 2 or anchor.shape != positive.shape:
        raise ValueError(f"anchor and positive must both be [B, D]; got {tuple(anchor.shape)} and {tuple(positive.shape)}")
    if anchor.shape[0] < 1:
        raise ValueError("infonce needs at least one anchor (B >= 1)")
    if negative is not None and (negative.dim() != 2 or negative.shape[1] != anchor.shape[1]):
        raise ValueError(f"negative must be [M, D] with D = {anchor.shape[1]}; got {tuple(negative.shape)}")
    tensors = [anchor, positive] + ([] if negative is None else [negative])
    if not anchor.is_floating_point() or any(t.dtype != anchor.dtype for t in tensors):
        raise TypeError(f"anchor, positive and negative must share one floating dtype; got {[t.dtype for t in tensors]}")
    if any(t.device != anchor.device for t in tensors):
        raise ValueError(f"anchor, positive and negative must be on one device; got {[str(t.device) for t in tensors]}")
    if not float(temperature) > 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")


def infonce_candidates(positive, negative):
    """The candidates of InfoNCE: cat(positive, negative) [N, D], N = B + M; just positive when there are no negatives."""
    return positive if negative is None or len(negative) == 0 else torch.cat([positive, negative])


# ----------------------------------------------------------------------------- InfoNCE: reference, chunked

def infonce_reference(anchor, positive, negative=None, temperature=0.03):
    """The ground truth: materialise the B x N logits in fp32 and let F.cross_entropy do the rest."""
    candidates = infonce_candidates(positive, negative)
    dtype = accumulation_dtype(anchor.dtype)
    logits = anchor.to(dtype) @ candidates.to(dtype).T / temperature
    return F.cross_entropy(logits, torch.arange(len(anchor), device=anchor.device))


class ChunkedInfoNCE(torch.autograd.Function):
    """InfoNCE that never holds more than one block x block tile of logits.

    forward : for each block of anchors, stream the candidate blocks through an online log-sum-exp
              (keep a running max and a running sum rescaled whenever the max grows); save lse only.
    backward: recompute each tile, turn it into softmax with the saved lse, subtract the one-hot label,
              and accumulate both gradients. The Triton version does the same a chunk of rows at a
              time, with the two products done by cuBLAS.
    """

    @staticmethod
    def forward(ctx, anchor, candidates, temperature, block):
        acc = accumulation_dtype(anchor.dtype)
        a, c = anchor.to(acc), candidates.to(acc)
        lse = torch.empty(len(a), dtype=acc, device=a.device)
        for i0 in range(0, len(a), block):  # Triton: one program per anchor tile
            rows = a[i0:i0 + block]
            running_max = torch.full((len(rows),), -math.inf, dtype=acc, device=a.device)
            running_sum = torch.zeros(len(rows), dtype=acc, device=a.device)
            for j0 in range(0, len(c), block):  # Triton: the loop over candidate tiles
                logits = (rows @ c[j0:j0 + block].T).div_(temperature)
                new_max = torch.maximum(running_max, logits.amax(dim=1))
                # what was summed under the old max is rescaled to the new one, then this tile is added
                running_sum = running_sum * torch.exp(running_max - new_max) + logits.sub_(new_max[:, None]).exp_().sum(dim=1)
                running_max = new_max
            lse[i0:i0 + block] = running_max + running_sum.log()
        positive_logit = (a * c[:len(a)]).sum(dim=1) / temperature  # label of anchor i is candidate i
        ctx.save_for_backward(anchor, candidates, lse)
        ctx.temperature, ctx.block = temperature, block
        return (lse - positive_logit).mean()

    @staticmethod
    def backward(ctx, grad_loss):
        anchor, candidates, lse = ctx.saved_tensors
        temperature, block = ctx.temperature, ctx.block
        a, c = anchor.to(lse.dtype), candidates.to(lse.dtype)
        scale = grad_loss.to(lse.dtype) / (len(a) * temperature)  # the mean's 1/B, the logits' 1/tau
        grad_a, grad_c = torch.zeros_like(a), torch.zeros_like(c)
        for i0 in range(0, len(a), block):
            rows = a[i0:i0 + block]
            for j0 in range(0, len(c), block):
                cols = c[j0:j0 + block]
                logits = (rows @ cols.T).div_(temperature)  # recomputed, never stored
                g = logits.sub_(lse[i0:i0 + block, None]).exp_()  # softmax tile P
                g.diagonal(i0 - j0).sub_(1.0)  # P - Y: the label of global row i is global column i
                g.mul_(scale)  # d loss / d logits, times 1/tau
                grad_a[i0:i0 + block].addmm_(g, cols)
                grad_c[j0:j0 + block].addmm_(g.T, rows)
        return grad_a.to(anchor.dtype), grad_c.to(candidates.dtype), None, None


def infonce_chunked(anchor, positive, negative=None, temperature=0.03, block=None):
    """InfoNCE in O((B + N) D + block^2) memory; block defaults to 1024 on CPU, 4096 on GPU."""
    block = block or (4096 if anchor.is_cuda else 1024)
    return ChunkedInfoNCE.apply(anchor, infonce_candidates(positive, negative), float(temperature), block)


# ----------------------------------------------------------------------------- Triton

@dataclass(frozen=True)
class TritonConfig:
    """Tile sizes (compile-time constants) and launch settings of the InfoNCE kernels."""
    block_m: int = 32  # anchors per tile
    block_n: int = 32  # candidates per tile
    block_d: int = 32  # embedding dimensions per tl.dot step of the loop over D
    num_warps: int = 4
    num_stages: int = 2
    min_programs: int = 1  # forward: split the loop over candidate tiles until the grid has this many programs
    chunk_rows: int = 0  # backward: anchor rows per chunk of G; 0 = automatic (see _chunk_rows)

    def __str__(self):
        return f"{self.block_m}x{self.block_n}x{self.block_d} w{self.num_warps} s{self.num_stages}" + (
            f" R{self.chunk_rows}" if self.chunk_rows else "")


def triton_configs(device, dtype):
    """The InfoNCE configs worth timing, best guess first; no autotuner (the GPU report times each)."""
    if device.type != "cuda":  # the interpreter: small tiles keep it quick (tl.dot needs every dim >= 16)
        return [TritonConfig()]
    programs = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    if dtype == torch.float32:
        return [TritonConfig(64, 64, 32, 4, 2, programs), TritonConfig(32, 64, 32, 4, 2, programs)]
    # 128x256, the classic large-matmul tile (144 KiB of shared memory), keeps the tensor cores
    # busiest at large shapes; 128x128 fits two G-kernel programs per SM; 64x128 suits the forward
    # at small B. bench/gpu_report.py times all three (docs/bench/ has the measured tables).
    return [TritonConfig(128, 256, 64, 8, 3, programs), TritonConfig(128, 128, 64, 8, 3, programs),
            TritonConfig(64, 128, 64, 4, 3, programs)]


def _split(n_tiles, n_programs, min_programs):
    """Cut a loop over n_tiles into contiguous pieces, one program each, until n_programs * pieces
    reaches min_programs (a small batch would otherwise leave most of a GPU idle). -> (pieces, tiles each)"""
    pieces = max(1, min(n_tiles, -(-min_programs // n_programs)))
    per_piece = -(-n_tiles // pieces)
    return -(-n_tiles // per_piece), per_piece


def _chunk_rows(B, N, D, element_size, requested=0):
    """Anchor rows R per chunk of the backward. G [R, N] may take as much memory as the embeddings
    ((B + N) D elements) or 64 MiB, whichever is more: the extra memory stays O((B + N) D), never B x N.
    R is a multiple of 64 (whole tiles, and shapes cuBLAS likes) and at least 64."""
    if requested:
        return max(1, min(requested, B))
    budget = max((B + N) * D * element_size, 64 * 2**20)
    return min(B, max(64, budget // (N * element_size) // 64 * 64))


if triton is not None:

    @triton.jit(do_not_specialize=["B", "N", "tiles_per_piece"])  # one compile for every batch size
    def _infonce_fwd_kernel(
        anchor_ptr,  # [B, D] anchors, contiguous
        cand_ptr,  # [N, D] candidates = cat(positives, negatives), contiguous
        lse_ptr,  # [S, B] fp32 out: log-sum-exp of each row over this program's piece of the candidates
        pos_ptr,  # [S, B] fp32 out: the label logit a_i . c_i / tau if column i is in this piece, else 0
        B, N, D,
        inv_temperature,  # 1 / tau
        tiles_per_piece,  # candidate tiles handled by one program along grid axis 1
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (no TF32 rounding), else "tf32" (ignored for 16-bit)
    ):
        row_start = tl.program_id(0) * BLOCK_M
        rows = row_start + tl.arange(0, BLOCK_M).to(tl.int64)  # int64: B * D may pass 2^31
        row_ok = rows < B
        running_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
        running_sum = tl.zeros([BLOCK_M], tl.float32)
        label_logit = tl.zeros([BLOCK_M], tl.float32)
        n_start = tl.program_id(1) * tiles_per_piece * BLOCK_N
        for n0 in range(n_start, tl.minimum(n_start + tiles_per_piece * BLOCK_N, N), BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
            col_ok = cols < N
            # logits tile = a[rows] . c[cols]^T, accumulated in fp32 over D in BLOCK_D steps (masked tail)
            logits = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for d0 in range(0, D, BLOCK_D):
                dims = d0 + tl.arange(0, BLOCK_D)
                a = tl.load(anchor_ptr + rows[:, None] * D + dims[None, :], mask=row_ok[:, None] & (dims[None, :] < D), other=0.0)
                c = tl.load(cand_ptr + cols[:, None] * D + dims[None, :], mask=col_ok[:, None] & (dims[None, :] < D), other=0.0)
                logits = tl.dot(a, tl.trans(c), logits, input_precision=PRECISION)
            logits = tl.where(col_ok[None, :], logits * inv_temperature, float("-inf"))
            if (n0 < row_start + BLOCK_M) & (n0 + BLOCK_N > row_start):  # only tiles on the diagonal hold labels
                label_logit += tl.sum(tl.where(rows[:, None] == cols[None, :], logits, 0.0), axis=1)
            # online softmax: rescale the running sum to the new max, then add this tile
            new_max = tl.maximum(running_max, tl.max(logits, axis=1))
            running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(logits - new_max[:, None]), axis=1)
            running_max = new_max
        piece = tl.program_id(1).to(tl.int64) * B
        tl.store(lse_ptr + piece + rows, running_max + tl.log(running_sum), mask=row_ok)
        tl.store(pos_ptr + piece + rows, label_logit, mask=row_ok)

    @triton.jit(do_not_specialize=["R", "row_offset"])  # N stays specialised: it masks G's contiguous stores
    def _infonce_g_kernel(
        anchor_ptr,  # [R, D] this chunk's anchors, contiguous: rows row_offset .. row_offset + R of the batch
        cand_ptr,  # [N, D] candidates, contiguous
        lse_ptr,  # [R] fp32: the chunk's log-sum-exps from the forward
        g_ptr,  # [R, N] out, row stride stride_g, in the input dtype: G = P - Y
        R, N, D, stride_g, row_offset, inv_temperature,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    ):
        # grid axis 0 runs over anchor tiles, so consecutive programs share one candidate tile (L2 reuse)
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
        row_ok, col_ok = rows < R, cols < N
        logits = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)  # recomputed exactly as in the forward
        for d0 in range(0, D, BLOCK_D):
            dims = d0 + tl.arange(0, BLOCK_D)
            a = tl.load(anchor_ptr + rows[:, None] * D + dims[None, :], mask=row_ok[:, None] & (dims[None, :] < D), other=0.0)
            c = tl.load(cand_ptr + cols[:, None] * D + dims[None, :], mask=col_ok[:, None] & (dims[None, :] < D), other=0.0)
            logits = tl.dot(a, tl.trans(c), logits, input_precision=PRECISION)
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        g = tl.exp(logits * inv_temperature - lse[:, None])  # softmax tile P, from the saved lse
        g = tl.where(rows[:, None] + row_offset == cols[None, :], g - 1.0, g)  # P - Y: in [-1, 1], safe in 16 bits
        tl.store(g_ptr + rows[:, None] * stride_g + cols[None, :], g.to(g_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])


def _triton_launch_args(config, dtype):
    return dict(BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_D=config.block_d,
                PRECISION="ieee" if dtype == torch.float32 else "tf32",
                num_warps=config.num_warps, num_stages=config.num_stages)


def _matmul_fp32(x, y):
    """x @ y in fp32. 16-bit factors stay 16-bit (tensor cores); cuBLAS accumulates in fp32 and, asked with
    out_dtype (CUDA only), writes fp32 too: the product is never rounded to 16 bits."""
    if x.dtype == torch.float32 or not x.is_cuda:
        return torch.mm(x.float(), y.float())  # CPU: no 16-bit matmul into fp32 (only the interpreter gets here)
    return torch.mm(x, y, out_dtype=torch.float32)


def _accumulate_fp32(total, x, y):
    """total + x @ y for an fp32 total. On CUDA, one cuBLAS call (beta = 1) adds the fp32 product of 16-bit
    factors straight into total: torch.addmm with out_dtype (an fp32 addend needs torch >= 2.11, as pinned)."""
    if x.dtype == torch.float32 or not x.is_cuda:
        return total.addmm_(x.float(), y.float())
    return torch.addmm(total, x, y, out_dtype=torch.float32)


class TritonInfoNCE(torch.autograd.Function):
    """InfoNCE with a fused Triton forward and a chunked-G backward (Triton for G, cuBLAS for the products)."""

    @staticmethod
    def forward(ctx, anchor, candidates, temperature, config):
        anchor, candidates = anchor.contiguous(), candidates.contiguous()
        (B, D), N = anchor.shape, len(candidates)
        m_tiles, n_tiles = triton.cdiv(B, config.block_m), triton.cdiv(N, config.block_n)
        pieces, per_piece = _split(n_tiles, m_tiles, config.min_programs)
        lse_parts = torch.empty((pieces, B), dtype=torch.float32, device=anchor.device)
        label_parts = torch.empty_like(lse_parts)
        launcher(_infonce_fwd_kernel)[(m_tiles, pieces)](
            anchor, candidates, lse_parts, label_parts, B, N, D, 1.0 / temperature, per_piece,
            **_triton_launch_args(config, anchor.dtype))
        lse = torch.logsumexp(lse_parts, dim=0)  # combine the pieces of each row (a fixed order: deterministic)
        ctx.save_for_backward(anchor, candidates, lse)
        ctx.temperature, ctx.config = temperature, config
        return (lse - label_parts.sum(dim=0)).mean()

    @staticmethod
    def backward(ctx, grad_loss):
        """For each chunk of R anchor rows: G = P - Y [R, N] (Triton), d a[rows] = G c, d c += G^T a[rows]
        (cuBLAS). G holds P - Y unscaled, because (P - Y) / (B tau) underflows fp16 at large B; the factor
        grad / (B tau) is applied in fp32 at the end. d c is summed over chunks in an fp32 buffer."""
        anchor, candidates, lse = ctx.saved_tensors
        config, (B, D), N = ctx.config, anchor.shape, len(candidates)
        want_anchor, want_candidates = ctx.needs_input_grad[:2]
        if not (want_anchor or want_candidates):
            return None, None, None, None
        scale = grad_loss.to(torch.float32) / (B * ctx.temperature)  # the mean's 1/B and the logits' 1/tau
        R = _chunk_rows(B, N, D, anchor.element_size(), config.chunk_rows)
        # G's rows start on 16-element boundaries: aligned vector stores here, cuBLAS's fast paths later
        g_buffer = torch.empty((R, triton.cdiv(N, 16) * 16), dtype=anchor.dtype, device=anchor.device)
        grad_anchor = torch.empty_like(anchor) if want_anchor else None
        grad_candidates = torch.zeros((N, D), dtype=torch.float32, device=anchor.device) if want_candidates else None
        launch = _triton_launch_args(config, anchor.dtype)
        for r0 in range(0, B, R):
            rows = min(R, B - r0)
            g, chunk = g_buffer[:rows, :N], anchor[r0:r0 + rows]
            launcher(_infonce_g_kernel)[(triton.cdiv(rows, config.block_m), triton.cdiv(N, config.block_n))](
                chunk, candidates, lse[r0:r0 + rows], g, rows, N, D, g_buffer.stride(0), r0, 1.0 / ctx.temperature, **launch)
            if want_anchor:
                grad_anchor[r0:r0 + rows] = _matmul_fp32(g, candidates).mul_(scale)
            if want_candidates:
                grad_candidates = _accumulate_fp32(grad_candidates, g.T, chunk)
        if want_candidates:
            grad_candidates = grad_candidates.mul_(scale).to(candidates.dtype)
        return grad_anchor, grad_candidates, None, None


def infonce_triton(anchor, positive, negative=None, temperature=0.03, config=None):
    """InfoNCE with the Triton kernels; config (a TritonConfig) defaults to triton_configs()[0]."""
    require_triton(anchor.device)
    if anchor.dtype not in TRITON_DTYPES:
        raise TypeError(f"the Triton InfoNCE takes {TRITON_DTYPES}; got {anchor.dtype}")
    config = config or triton_configs(anchor.device, anchor.dtype)[0]
    return TritonInfoNCE.apply(anchor, infonce_candidates(positive, negative), float(temperature), config)


def infonce(anchor, positive, negative=None, temperature=0.03, backend="auto"):
    """One-way InfoNCE of LCO-Emb: candidates = cat(positive, negative), label of anchor i is i; mean loss.

    anchor, positive: [B, D]; negative: [M, D] or None (all anchors' hard negatives, flattened).
    backend: "auto" | "reference" | "chunked" | "triton" (see the module docstring). Returns an fp32 scalar.
    """
    _check_infonce_inputs(anchor, positive, negative, temperature)
    path = choose_path("infonce", backend, anchor.device, "chunked")
    if path == "reference":
        return infonce_reference(anchor, positive, negative, temperature)
    if path == "chunked":
        return infonce_chunked(anchor, positive, negative, temperature)
    return infonce_triton(anchor, positive, negative, temperature)

