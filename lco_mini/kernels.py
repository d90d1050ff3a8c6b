"""InfoNCE and pooling for LCO-Emb: a reference, a chunked PyTorch version and fused Triton kernels.

THE LOSS. LCO-Emb trains with one-way InfoNCE. Anchors a [B, D], positives p [B, D] and hard
negatives n [M, D] (every anchor's negatives, flattened) give the candidates c = cat(p, n) [N, D],
N = B + M, and anchor i has to pick out candidate i among all N:

    logits[i, j] = a_i . c_j / tau                       (tau = 0.03)
    loss         = mean_i ( lse_i - logits[i, i] ),       lse_i = log sum_j exp(logits[i, j])

The gradient has a closed form. With P = softmax(logits) row by row and Y the one-hot labels,

    dloss/dlogits = (P - Y) / B,     d a = (P - Y) c / (B tau),     d c = (P - Y)^T a / (B tau)

and P[i, j] = exp(logits[i, j] - lse_i) needs nothing but the B numbers lse. So the B x N logits, the
only big thing here (16 GiB of fp32 at B = N = 65536, next to 64 MiB of embeddings at D = 256), never
have to exist at once: the forward keeps lse, the backward recomputes the logits one tile at a time.
That is FlashAttention's trick applied to a contrastive loss (as in Inf-CL and Liger's fused linear
cross-entropy).

Three implementations give the same numbers (tests/test_kernels.py checks each against the others):
  reference  three lines around F.cross_entropy; materialises the logits. The ground truth.
  chunked    a torch.autograd.Function in plain PyTorch that walks the logits block by block with an
             online log-sum-exp; memory O((B + N) D + block^2); CPU and GPU. Read this one to learn the
             algorithm: the Triton kernels take the same steps, one tile per program.
  triton     fused kernels: the forward streams candidate tiles through an online softmax; the backward
             is two kernels, d(anchor) and d(candidates), so that each output row has one owner (no
             atomics, bit-for-bit deterministic). fp32 / bf16 / fp16 inputs, fp32 accumulation.

POOLING turns hidden states [B, T, D] into one vector per row: the last attended token (LCO-Emb's
choice; right for left and right padding alike) or the masked mean, then L2-normalised. A reference
and a Triton kernel pair (forward, backward) that never builds a masked [B, T, D] copy.

backend="auto" takes Triton for CUDA tensors and the PyTorch path on CPU, and says once which. On CPU,
backend="triton" runs the kernels in Triton's interpreter when TRITON_INTERPRET=1 (slow; for tests).
The benchmark and the GPU report are at the end of this file:
    python -m lco_mini.kernels [--big] [--gpu-report OUTDIR [--dry-run]]      (see --help)
"""
import math
import os
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # triton comes with torch's Linux wheels; elsewhere only the PyTorch paths exist
    triton = None

BACKENDS = ("auto", "reference", "chunked", "triton")
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
NORMALIZE_EPS = 1e-12  # F.normalize's default


# ----------------------------------------------------------------------------- checks, backend choice

_announced = set()


def _announce(what, path, why):
    """Say once per process which path a function takes: no silent fallbacks."""
    if (what, path) not in _announced:
        _announced.add((what, path))
        print(f"lco_mini.kernels: {what} uses the {path} path ({why})", file=sys.stderr)


def _require_triton(device):
    if triton is None:
        raise RuntimeError("backend='triton' needs the triton package (Linux: pip install triton); "
                           "use backend='chunked' instead")
    if device.type == "cpu" and not triton_interprets():
        raise RuntimeError("backend='triton' got CPU tensors: Triton kernels run on CUDA GPUs, and on CPU only in "
                           "Triton's interpreter, which TRITON_INTERPRET=1 switches on when set before triton is "
                           "imported (e.g. in the shell). Use backend='chunked' on CPU.")
    if device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"backend='triton' supports CUDA (or CPU with TRITON_INTERPRET=1), not {device.type}")


def _choose_path(what, backend, device, pytorch_path):
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    if backend == "triton":
        _require_triton(device)
    if backend != "auto":
        return backend
    if device.type == "cuda" and triton is not None:
        path, why = "triton", "CUDA tensors"
    elif device.type == "cuda":
        path, why = pytorch_path, "triton is not installed"
    else:
        path, why = pytorch_path, f"tensors on {device.type}"
    _announce(what, path, why)
    return path


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


def _check_pool_inputs(hidden, attention_mask, mode):
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [B, T, D]; got {tuple(hidden.shape)}")
    if tuple(attention_mask.shape) != tuple(hidden.shape[:2]):
        raise ValueError(f"attention_mask must be [B, T] = {tuple(hidden.shape[:2])}; got {tuple(attention_mask.shape)}")
    if mode not in ("last", "mean"):
        raise ValueError(f"mode must be 'last' or 'mean'; got {mode!r}")
    if not hidden.is_floating_point():
        raise TypeError(f"hidden must be a floating tensor; got {hidden.dtype}")
    if attention_mask.device != hidden.device:
        raise ValueError(f"hidden is on {hidden.device} but attention_mask on {attention_mask.device}")
    empty = (attention_mask == 0).all(dim=1)
    if empty.any():
        raise ValueError(f"rows {empty.nonzero().flatten().tolist()} of attention_mask have no attended token: nothing to pool")


def _candidates(positive, negative):
    return positive if negative is None or len(negative) == 0 else torch.cat([positive, negative])


def _accumulation_dtype(dtype):
    """fp32 for fp32/bf16/fp16 inputs; fp64 stays fp64 (so gradcheck works)."""
    return torch.promote_types(dtype, torch.float32)


# ----------------------------------------------------------------------------- InfoNCE: reference, chunked

def infonce_reference(anchor, positive, negative=None, temperature=0.03):
    """The ground truth: materialise the B x N logits in fp32 and let F.cross_entropy do the rest."""
    candidates = _candidates(positive, negative)
    dtype = _accumulation_dtype(anchor.dtype)
    logits = anchor.to(dtype) @ candidates.to(dtype).T / temperature
    return F.cross_entropy(logits, torch.arange(len(anchor), device=anchor.device))


class ChunkedInfoNCE(torch.autograd.Function):
    """InfoNCE that never holds more than one block x block tile of logits.

    forward : for each block of anchors, stream the candidate blocks through an online log-sum-exp
              (keep a running max and a running sum rescaled whenever the max grows); save lse only.
    backward: recompute each tile, turn it into softmax with the saved lse, subtract the one-hot label,
              and accumulate both gradients. The Triton version splits this double loop into two
              kernels so that every output row is written by a single program.
    """

    @staticmethod
    def forward(ctx, anchor, candidates, temperature, block):
        acc = _accumulation_dtype(anchor.dtype)
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
    return ChunkedInfoNCE.apply(anchor, _candidates(positive, negative), float(temperature), block)


# ----------------------------------------------------------------------------- Triton plumbing

def triton_interprets():
    """True when triton was imported with TRITON_INTERPRET=1: every @triton.jit function (ours and those of
    triton.language, such as tl.zeros) is then run by Triton's CPU interpreter. The switch is read when
    the functions are defined, so it must be in the environment before triton is first imported."""
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(tl.zeros, InterpretedFunction)


def _launcher(kernel):
    """The kernel, made ready for the interpreter when that is what runs it."""
    if triton_interprets():
        _patch_interpreter_for_numpy_2_4()
    return kernel


def _patch_interpreter_for_numpy_2_4():
    """Triton 3.6's interpreter turns loop bounds into ints with int(one-element array), which NumPy >= 2.4
    refuses (triton-lang/triton#9171, fixed upstream). Read the element explicitly; interpreter only."""
    import triton.runtime.interpreter as interpreter
    original = interpreter._patch_lang_tensor
    if getattr(original, "lco_mini_patched", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched.lco_mini_patched = True
    interpreter._patch_lang_tensor = patched


@dataclass(frozen=True)
class TritonConfig:
    """Tile sizes (compile-time constants) and launch settings of the InfoNCE kernels."""
    block_m: int = 32  # anchors per tile
    block_n: int = 32  # candidates per tile
    block_d: int = 32  # embedding dimensions per tl.dot step of the loop over D
    num_warps: int = 4
    num_stages: int = 2
    min_programs: int = 1  # split each kernel's loop over tiles until the grid has this many programs

    def __str__(self):
        return f"{self.block_m}x{self.block_n}x{self.block_d} w{self.num_warps} s{self.num_stages}"


def triton_configs(device, dtype):
    """The InfoNCE configs worth timing, best guess first; no autotuner, the benchmark tries each."""
    if device.type != "cuda":  # the interpreter: small tiles keep it quick (tl.dot needs every dim >= 16)
        return [TritonConfig()]
    programs = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    if dtype == torch.float32:
        return [TritonConfig(64, 64, 32, 4, 2, programs), TritonConfig(32, 64, 32, 4, 2, programs)]
    return [TritonConfig(64, 128, 64, 4, 3, programs), TritonConfig(128, 64, 64, 8, 3, programs)]


def _split(n_tiles, n_programs, min_programs):
    """Cut a loop over n_tiles into contiguous pieces, one program each, until n_programs * pieces
    reaches min_programs (a small batch would otherwise leave most of a GPU idle). -> (pieces, tiles each)"""
    pieces = max(1, min(n_tiles, -(-min_programs // n_programs)))
    per_piece = -(-n_tiles // pieces)
    return -(-n_tiles // per_piece), per_piece


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
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # int64: B * D may pass 2^31
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
            label_logit += tl.sum(tl.where(rows[:, None] == cols[None, :], logits, 0.0), axis=1)
            # online softmax: rescale the running sum to the new max, then add this tile
            new_max = tl.maximum(running_max, tl.max(logits, axis=1))
            running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(logits - new_max[:, None]), axis=1)
            running_max = new_max
        piece = tl.program_id(1).to(tl.int64) * B
        tl.store(lse_ptr + piece + rows, running_max + tl.log(running_sum), mask=row_ok)
        tl.store(pos_ptr + piece + rows, label_logit, mask=row_ok)

    @triton.jit(do_not_specialize=["B", "N", "tiles_per_piece"])  # one compile for every batch size
    def _infonce_bwd_anchor_kernel(
        anchor_ptr,  # [B, D] anchors, contiguous
        cand_ptr,  # [N, D] candidates, contiguous
        lse_ptr,  # [B] fp32: each row's log-sum-exp from the forward
        grad_ptr,  # [S, B, D] fp32, zeroed: this program's piece of (P - Y) c; only it touches these rows
        B, N, D, inv_temperature, tiles_per_piece,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    ):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < B
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        grad_ptr += tl.program_id(1).to(tl.int64) * B * D
        n_start = tl.program_id(1) * tiles_per_piece * BLOCK_N
        for n0 in range(n_start, tl.minimum(n_start + tiles_per_piece * BLOCK_N, N), BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
            col_ok = cols < N
            logits = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)  # recomputed exactly as in the forward
            for d0 in range(0, D, BLOCK_D):
                dims = d0 + tl.arange(0, BLOCK_D)
                a = tl.load(anchor_ptr + rows[:, None] * D + dims[None, :], mask=row_ok[:, None] & (dims[None, :] < D), other=0.0)
                c = tl.load(cand_ptr + cols[:, None] * D + dims[None, :], mask=col_ok[:, None] & (dims[None, :] < D), other=0.0)
                logits = tl.dot(a, tl.trans(c), logits, input_precision=PRECISION)
            g = tl.exp(logits * inv_temperature - lse[:, None])  # softmax tile P, from the saved lse
            g = tl.where(rows[:, None] == cols[None, :], g - 1.0, g)  # P - Y, in [-1, 1]: safe to cast to
            g = tl.where(row_ok[:, None] & col_ok[None, :], g, 0.0)  # 16 bits (the 1/(B tau) comes later)
            # (P - Y)[rows] += g . c[cols], streamed over D through the fp32 buffer this program owns
            for d0 in range(0, D, BLOCK_D):
                dims = d0 + tl.arange(0, BLOCK_D)
                c = tl.load(cand_ptr + cols[:, None] * D + dims[None, :], mask=col_ok[:, None] & (dims[None, :] < D), other=0.0)
                out = grad_ptr + rows[:, None] * D + dims[None, :]
                out_ok = row_ok[:, None] & (dims[None, :] < D)
                tl.store(out, tl.dot(g.to(c.dtype), c, tl.load(out, mask=out_ok, other=0.0), input_precision=PRECISION), mask=out_ok)
            tl.debug_barrier()  # this tile's writes land before the next tile reads them back

    @triton.jit(do_not_specialize=["B", "N", "tiles_per_piece"])  # one compile for every batch size
    def _infonce_bwd_cand_kernel(
        anchor_ptr,  # [B, D] anchors, contiguous
        cand_ptr,  # [N, D] candidates, contiguous
        lse_ptr,  # [B] fp32: each row's log-sum-exp from the forward
        grad_ptr,  # [S, N, D] fp32, zeroed: this program's piece of (P - Y)^T a; only it touches these rows
        B, N, D, inv_temperature, tiles_per_piece,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    ):
        cols = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        grad_ptr += tl.program_id(1).to(tl.int64) * N * D
        m_start = tl.program_id(1) * tiles_per_piece * BLOCK_M
        for m0 in range(m_start, tl.minimum(m_start + tiles_per_piece * BLOCK_M, B), BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
            row_ok = rows < B
            logits = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for d0 in range(0, D, BLOCK_D):
                dims = d0 + tl.arange(0, BLOCK_D)
                a = tl.load(anchor_ptr + rows[:, None] * D + dims[None, :], mask=row_ok[:, None] & (dims[None, :] < D), other=0.0)
                c = tl.load(cand_ptr + cols[:, None] * D + dims[None, :], mask=col_ok[:, None] & (dims[None, :] < D), other=0.0)
                logits = tl.dot(a, tl.trans(c), logits, input_precision=PRECISION)
            lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
            g = tl.exp(logits * inv_temperature - lse[:, None])
            g = tl.where(rows[:, None] == cols[None, :], g - 1.0, g)
            g = tl.where(row_ok[:, None] & col_ok[None, :], g, 0.0)
            # (P - Y)^T[cols] += g^T . a[rows]
            for d0 in range(0, D, BLOCK_D):
                dims = d0 + tl.arange(0, BLOCK_D)
                a = tl.load(anchor_ptr + rows[:, None] * D + dims[None, :], mask=row_ok[:, None] & (dims[None, :] < D), other=0.0)
                out = grad_ptr + cols[:, None] * D + dims[None, :]
                out_ok = col_ok[:, None] & (dims[None, :] < D)
                tl.store(out, tl.dot(tl.trans(g.to(a.dtype)), a, tl.load(out, mask=out_ok, other=0.0), input_precision=PRECISION), mask=out_ok)
            tl.debug_barrier()


def _triton_launch_args(config, dtype):
    return dict(BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_D=config.block_d,
                PRECISION="ieee" if dtype == torch.float32 else "tf32",
                num_warps=config.num_warps, num_stages=config.num_stages)


class TritonInfoNCE(torch.autograd.Function):
    """InfoNCE with fused Triton kernels; the same algorithm as ChunkedInfoNCE, one tile per program."""

    @staticmethod
    def forward(ctx, anchor, candidates, temperature, config):
        anchor, candidates = anchor.contiguous(), candidates.contiguous()
        (B, D), N = anchor.shape, len(candidates)
        m_tiles, n_tiles = triton.cdiv(B, config.block_m), triton.cdiv(N, config.block_n)
        pieces, per_piece = _split(n_tiles, m_tiles, config.min_programs)
        lse_parts = torch.empty((pieces, B), dtype=torch.float32, device=anchor.device)
        label_parts = torch.empty_like(lse_parts)
        _launcher(_infonce_fwd_kernel)[(m_tiles, pieces)](
            anchor, candidates, lse_parts, label_parts, B, N, D, 1.0 / temperature, per_piece,
            **_triton_launch_args(config, anchor.dtype))
        lse = torch.logsumexp(lse_parts, dim=0)  # combine the pieces of each row (a fixed order: deterministic)
        ctx.save_for_backward(anchor, candidates, lse)
        ctx.temperature, ctx.config = temperature, config
        return (lse - label_parts.sum(dim=0)).mean()

    @staticmethod
    def backward(ctx, grad_loss):
        anchor, candidates, lse = ctx.saved_tensors
        config, inv_temperature = ctx.config, 1.0 / ctx.temperature
        (B, D), N = anchor.shape, len(candidates)
        m_tiles, n_tiles = triton.cdiv(B, config.block_m), triton.cdiv(N, config.block_n)
        scale = grad_loss.to(torch.float32) * inv_temperature / B  # the mean's 1/B and the logits' 1/tau
        launch = _triton_launch_args(config, anchor.dtype)
        grad_anchor = grad_candidates = None
        if ctx.needs_input_grad[0]:  # one program per anchor tile, looping over candidate tiles
            pieces, per_piece = _split(n_tiles, m_tiles, config.min_programs)
            parts = torch.zeros((pieces, B, D), dtype=torch.float32, device=anchor.device)
            _launcher(_infonce_bwd_anchor_kernel)[(m_tiles, pieces)](
                anchor, candidates, lse, parts, B, N, D, inv_temperature, per_piece, **launch)
            grad_anchor = (parts.sum(dim=0) * scale).to(anchor.dtype)
        if ctx.needs_input_grad[1]:  # one program per candidate tile, looping over anchor tiles
            pieces, per_piece = _split(m_tiles, n_tiles, config.min_programs)
            parts = torch.zeros((pieces, N, D), dtype=torch.float32, device=anchor.device)
            _launcher(_infonce_bwd_cand_kernel)[(n_tiles, pieces)](
                anchor, candidates, lse, parts, B, N, D, inv_temperature, per_piece, **launch)
            grad_candidates = (parts.sum(dim=0) * scale).to(candidates.dtype)
        return grad_anchor, grad_candidates, None, None


def infonce_triton(anchor, positive, negative=None, temperature=0.03, config=None):
    """InfoNCE with the fused Triton kernels; config (a TritonConfig) defaults to triton_configs()[0]."""
    _require_triton(anchor.device)
    if anchor.dtype not in TRITON_DTYPES:
        raise TypeError(f"the Triton InfoNCE takes {TRITON_DTYPES}; got {anchor.dtype}")
    config = config or triton_configs(anchor.device, anchor.dtype)[0]
    return TritonInfoNCE.apply(anchor, _candidates(positive, negative), float(temperature), config)


def infonce(anchor, positive, negative=None, temperature=0.03, backend="auto"):
    """One-way InfoNCE of LCO-Emb: candidates = cat(positive, negative), label of anchor i is i; mean loss.

    anchor, positive: [B, D]; negative: [M, D] or None (all anchors' hard negatives, flattened).
    backend: "auto" | "reference" | "chunked" | "triton" (see the module docstring). Returns an fp32 scalar.
    """
    _check_infonce_inputs(anchor, positive, negative, temperature)
    path = _choose_path("infonce", backend, anchor.device, "chunked")
    if path == "reference":
        return infonce_reference(anchor, positive, negative, temperature)
    if path == "chunked":
        return infonce_chunked(anchor, positive, negative, temperature)
    return infonce_triton(anchor, positive, negative, temperature)


# ----------------------------------------------------------------------------- pooling

def pool_reference(hidden, attention_mask, mode="last", normalize=True):
    """Last attended token (the largest index with mask != 0: left or right padding) or masked mean."""
    attended = attention_mask != 0
    if mode == "last":
        positions = torch.arange(hidden.shape[1], device=hidden.device)
        last = torch.where(attended, positions, -1).amax(dim=1)
        pooled = hidden[torch.arange(len(hidden), device=hidden.device), last]
    else:
        weights = attended.to(hidden.dtype).unsqueeze(-1)
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1)
    return F.normalize(pooled, dim=-1, eps=NORMALIZE_EPS) if normalize else pooled


if triton is not None:

    @triton.jit
    def _pool_fwd_kernel(
        hidden_ptr,  # [B, T, D] hidden states, unit stride along D
        mask_ptr,  # [B, T] attention mask (any int or float dtype; nonzero = attended), unit stride along T
        pooled_ptr,  # [B, D] fp32 out: the pooled vector, before normalisation
        last_ptr,  # [B] int32 out: index of the last attended position (for the backward)
        count_ptr,  # [B] int32 out: number of attended positions (for the backward)
        T, D, stride_hb, stride_ht, stride_mb,
        MEAN: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        dims = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        dim_ok = dims < D
        # 1. scan the mask: where is the last attended token, how many are there
        last_seen = tl.full([BLOCK_T], -1, tl.int32)
        n_seen = tl.zeros([BLOCK_T], tl.int32)
        for t0 in range(0, T, BLOCK_T):
            ts = t0 + tl.arange(0, BLOCK_T)
            attended = tl.load(mask_ptr + row * stride_mb + ts, mask=ts < T, other=0) != 0
            last_seen = tl.maximum(last_seen, tl.where(attended, ts, -1))
            n_seen += attended.to(tl.int32)
        last, count = tl.max(last_seen, axis=0), tl.sum(n_seen, axis=0)
        if tl.program_id(1) == 0:
            tl.store(last_ptr + row, last)
            tl.store(count_ptr + row, count)
        # 2. pool this program's BLOCK_D slice of the row
        if MEAN:  # padded positions are masked out of the loads: they cost no memory traffic
            total = tl.zeros([BLOCK_D], tl.float32)
            for t0 in range(0, T, BLOCK_T):
                ts = t0 + tl.arange(0, BLOCK_T)
                attended = tl.load(mask_ptr + row * stride_mb + ts, mask=ts < T, other=0) != 0
                h = tl.load(hidden_ptr + row * stride_hb + ts[:, None].to(tl.int64) * stride_ht + dims[None, :],
                            mask=attended[:, None] & dim_ok[None, :], other=0.0)
                total += tl.sum(h.to(tl.float32), axis=0)
            pooled = total / count.to(tl.float32)
        else:
            pooled = tl.load(hidden_ptr + row * stride_hb + last.to(tl.int64) * stride_ht + dims, mask=dim_ok, other=0.0).to(tl.float32)
        tl.store(pooled_ptr + row * D + dims, pooled, mask=dim_ok)

    @triton.jit
    def _pool_normalize_kernel(
        pooled_ptr,  # [B, D] fp32: pooled vectors
        out_ptr,  # [B, D] out, in the hidden states' dtype: pooled / max(||pooled||, eps), or pooled
        norm_ptr,  # [B] fp32 out: ||pooled|| (for the backward)
        D, eps, NORMALIZE: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        sum_sq = tl.zeros([BLOCK_D], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dims = d0 + tl.arange(0, BLOCK_D)
            x = tl.load(pooled_ptr + row * D + dims, mask=dims < D, other=0.0)
            sum_sq += x * x
        norm = tl.sqrt(tl.sum(sum_sq, axis=0))
        tl.store(norm_ptr + row, norm)
        denominator = tl.maximum(norm, eps) if NORMALIZE else 1.0
        for d0 in range(0, D, BLOCK_D):
            dims = d0 + tl.arange(0, BLOCK_D)
            x = tl.load(pooled_ptr + row * D + dims, mask=dims < D, other=0.0)
            tl.store(out_ptr + row * D + dims, (x / denominator).to(out_ptr.dtype.element_ty), mask=dims < D)

    @triton.jit
    def _pool_bwd_kernel(
        grad_out_ptr,  # [B, D] gradient of the pooled output, contiguous
        pooled_ptr,  # [B, D] fp32: pooled vectors from the forward
        norm_ptr,  # [B] fp32: their norms
        mask_ptr,  # [B, T] attention mask, unit stride along T
        last_ptr,  # [B] int32: last attended position
        count_ptr,  # [B] int32: number of attended positions
        grad_hidden_ptr,  # [B, T, D] out, contiguous: every element is written (zeros included)
        T, D, stride_mb, eps,
        MEAN: tl.constexpr, NORMALIZE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        ts = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
        t_ok = ts < T
        # how much of d(pooled) each of this program's positions receives
        if MEAN:
            attended = tl.load(mask_ptr + row * stride_mb + ts, mask=t_ok, other=0) != 0
            weight = attended.to(tl.float32) / tl.load(count_ptr + row).to(tl.float32)
        else:
            weight = (ts == tl.load(last_ptr + row)).to(tl.float32)
        # backward of y = u / max(||u||, eps): du = (dy - y (y . dy)) / ||u||, or dy / eps where clamped
        norm = tl.load(norm_ptr + row)
        denominator = tl.maximum(norm, eps) if NORMALIZE else 1.0
        y_dot_dy = tl.zeros([BLOCK_D], tl.float32)
        if NORMALIZE:
            for d0 in range(0, D, BLOCK_D):
                dims = d0 + tl.arange(0, BLOCK_D)
                y = tl.load(pooled_ptr + row * D + dims, mask=dims < D, other=0.0) / denominator
                y_dot_dy += y * tl.load(grad_out_ptr + row * D + dims, mask=dims < D, other=0.0).to(tl.float32)
        projection = tl.where(norm > eps, tl.sum(y_dot_dy, axis=0), 0.0)
        for d0 in range(0, D, BLOCK_D):
            dims = d0 + tl.arange(0, BLOCK_D)
            dy = tl.load(grad_out_ptr + row * D + dims, mask=dims < D, other=0.0).to(tl.float32)
            y = tl.load(pooled_ptr + row * D + dims, mask=dims < D, other=0.0) / denominator
            d_pooled = (dy - y * projection) / denominator if NORMALIZE else dy
            g = weight[:, None] * d_pooled[None, :]
            tl.store(grad_hidden_ptr + (row * T + ts[:, None].to(tl.int64)) * D + dims[None, :],
                     g.to(grad_hidden_ptr.dtype.element_ty), mask=t_ok[:, None] & (dims[None, :] < D))


def _pool_blocks(device):
    """(BLOCK_T, BLOCK_D) for the pooling kernels: small in the interpreter, a few KB per tile on GPU."""
    return (16, 16) if device.type != "cuda" else (32, 128)


class TritonPool(torch.autograd.Function):
    """Pooling + L2 normalisation with Triton: gather/mean kernel, normalise kernel, one backward kernel."""

    @staticmethod
    def forward(ctx, hidden, attention_mask, mean, normalize):
        if hidden.stride(-1) != 1:
            hidden = hidden.contiguous()
        mask = attention_mask.contiguous()
        mask = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
        (B, T, D), device = hidden.shape, hidden.device
        block_t, block_d = _pool_blocks(device)
        pooled = torch.empty((B, D), dtype=torch.float32, device=device)
        last, count = (torch.empty(B, dtype=torch.int32, device=device) for _ in range(2))
        _launcher(_pool_fwd_kernel)[(B, triton.cdiv(D, block_d))](
            hidden, mask, pooled, last, count, T, D, hidden.stride(0), hidden.stride(1), mask.stride(0),
            MEAN=mean, BLOCK_T=block_t, BLOCK_D=block_d)
        out = torch.empty((B, D), dtype=hidden.dtype, device=device)
        norm = torch.empty(B, dtype=torch.float32, device=device)
        _launcher(_pool_normalize_kernel)[(B,)](pooled, out, norm, D, NORMALIZE_EPS, NORMALIZE=normalize, BLOCK_D=block_d)
        ctx.save_for_backward(mask, pooled, norm, last, count)
        ctx.mean, ctx.normalize, ctx.hidden_shape, ctx.hidden_dtype = mean, normalize, hidden.shape, hidden.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        mask, pooled, norm, last, count = ctx.saved_tensors
        B, T, D = ctx.hidden_shape
        block_t, block_d = _pool_blocks(pooled.device)
        grad_hidden = torch.empty(ctx.hidden_shape, dtype=ctx.hidden_dtype, device=pooled.device)
        _launcher(_pool_bwd_kernel)[(B, triton.cdiv(T, block_t))](
            grad_out.contiguous(), pooled, norm, mask, last, count, grad_hidden, T, D, mask.stride(0), NORMALIZE_EPS,
            MEAN=ctx.mean, NORMALIZE=ctx.normalize, BLOCK_T=block_t, BLOCK_D=block_d)
        return grad_hidden, None, None, None


def pool(hidden, attention_mask, mode="last", normalize=True, backend="auto"):
    """Pool hidden states [B, T, D] to [B, D]: mode "last" (last attended token, any padding side) or
    "mean" (masked mean), then L2-normalise (F.normalize semantics) when normalize is True.

    backend: "auto" | "reference" | "triton"; "chunked" is accepted and means the PyTorch reference
    (pooling has no large intermediate to chunk). A row with no attended token is a ValueError.
    """
    _check_pool_inputs(hidden, attention_mask, mode)
    path = _choose_path("pool", backend, hidden.device, "reference")
    if path in ("reference", "chunked"):
        return pool_reference(hidden, attention_mask, mode, normalize)
    if hidden.dtype not in TRITON_DTYPES + (torch.float64,):
        raise TypeError(f"the Triton pooling takes fp32/bf16/fp16/fp64; got {hidden.dtype}")
    return TritonPool.apply(hidden, attention_mask, mode == "mean", normalize)



# ============================================================================= benchmark and GPU report
# Everything below serves `python -m lco_mini.kernels` (see --help); the library above does not use it.

import argparse  # noqa: E402  (only the benchmark needs these)
import csv  # noqa: E402
import ctypes  # noqa: E402
import gc  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

CPU_SHAPES = [(1024, 0, 256), (1024, 3, 256), (4096, 0, 128), (2048, 7, 64), (4096, 7, 128)]  # (B, hard negatives per anchor, D)
CPU_BIG_SHAPE = (65536, 0, 256)  # B = N = 65536: 16 GiB of fp32 logits
EAGER_LIMIT_BYTES = 100e9  # eager cells whose estimated memory passes this are skipped, not attempted


@dataclass
class _Plan:
    """What the GPU report runs; the dry run is the same code with tiny shapes on CPU."""
    check_dtypes: tuple
    bench_dtype: torch.dtype
    check_infonce: list  # (B, h, D)
    check_pool: list  # (B, T, D)
    infonce: list  # (B, h, D), N = B (1 + h)
    pool_sizes: tuple  # (Bs, Ts, Ds)
    infonce_until_s: float  # report-clock seconds after which no new InfoNCE cell starts
    pool_until_s: float
    provider_budget_s: float = 45.0
    compile_budget_s: float = 100.0


_GPU_PLAN = _Plan(
    check_dtypes=(torch.float32, torch.bfloat16, torch.float16), bench_dtype=torch.bfloat16,
    check_infonce=[(37, 3, 53), (300, 7, 1100), (1024, 3, 256)], check_pool=[(5, 67, 300), (64, 512, 1024)],
    infonce=[(1024, 0, 1024), (1024, 7, 1024), (4096, 7, 2560), (4096, 7, 4096), (16384, 0, 1024), (65536, 0, 1024)],
    pool_sizes=((8, 64, 256), (512, 2048, 8192), (1024, 4096)), infonce_until_s=240, pool_until_s=330)
_DRY_PLAN = _Plan(  # the interpreter has no bf16 tl.dot: fp32 only
    check_dtypes=(torch.float32,), bench_dtype=torch.float32,
    check_infonce=[(37, 3, 53)], check_pool=[(5, 13, 21)], infonce=[(37, 0, 53), (24, 2, 40)],
    pool_sizes=((3,), (7, 33), (40,)), infonce_until_s=600, pool_until_s=600)
_TOLERANCE = {  # (loss abs, grad max-abs error / max-abs value), against the fp32 reference on the same inputs
    torch.float32: (1e-4, 2e-4), torch.float16: (1e-3, 5e-3), torch.bfloat16: (1e-3, 2e-2), torch.float64: (1e-6, 1e-6)}
_POOL_TOLERANCE = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2, torch.float64: 1e-10}  # max rel error


def _proc_status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"no {field} in /proc/self/status")


def peak_rss_bytes(fn):
    """Resident memory that fn() adds at its peak, in bytes (Linux). torch's CPU allocations are invisible
    to tracemalloc but not to the kernel: reset its high-water mark (VmHWM), run fn, read the mark."""
    gc.collect()
    try:  # hand freed heap pages back to the OS, so that the baseline is what is really live
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _proc_status_kb("VmRSS")
    fn()
    return (_proc_status_kb("VmHWM") - before) * 1024


def _available_bytes(device):
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


def _eager_bytes(B, N):
    """The eager reference holds about four B x N fp32 matrices: logits, log-softmax and two gradients."""
    return 4 * 4 * B * N


def _embeddings(B, h, D, dtype, device, seed=0):
    """Unit-norm anchors, positives and B*h hard negatives (None when h = 0), as leaf tensors."""
    gen = torch.Generator(device=device).manual_seed(seed)
    x = F.normalize(torch.randn(((2 + h) * B, D), generator=gen, device=device), dim=-1).to(dtype)
    a, p, n = (t.clone().requires_grad_() for t in (x[:B], x[B:2 * B], x[2 * B:]))
    return a, p, (n if h else None)


def _loss_and_grads(fn, a, p, n):
    leaves = [t for t in (a, p, n) if t is not None]
    for t in leaves:
        t.grad = None
    loss = fn(a, p, n)
    loss.backward()
    return loss.detach().float(), [t.grad.float() for t in leaves]


def _errors(result, truth):
    """(|loss - loss_ref|, max over tensors of max|g - g_ref| / max|g_ref|)."""
    (loss, grads), (ref_loss, ref_grads) = result, truth
    grad_err = max(((g - r).abs().max() / r.abs().max().clamp_min(1e-30)).item() for g, r in zip(grads, ref_grads))
    return abs(loss - ref_loss).item(), grad_err


class _Clock:
    """Median time (ms) and extra peak memory (bytes) of a function, on CUDA (do_bench) or on CPU."""

    def __init__(self, device, repeats=3, rep_ms=60):
        self.cuda, self.repeats, self.rep_ms = device.type == "cuda", repeats, rep_ms

    def ms(self, fn):
        if self.cuda:
            import triton.testing
            return triton.testing.do_bench(fn, warmup=10, rep=self.rep_ms, return_mode="median")
        times = []
        for _ in range(self.repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return 1e3 * statistics.median(times)

    def peak_bytes(self, fn):
        if not self.cuda:
            return peak_rss_bytes(fn)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before


def _fmt(x):
    if isinstance(x, float):
        return f"{x:.0f}" if abs(x) >= 100 else f"{x:.1f}" if abs(x) >= 10 else f"{x:.3g}"
    return str(x)


def _markdown(rows, columns):
    cells = [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    line = lambda items: "| " + " | ".join(s.ljust(w) for s, w in zip(items, widths)) + " |"  # noqa: E731
    return "\n".join([line(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in cells])


# ----------------------------------------------------------------------------- CPU table

def cpu_benchmark(shapes, repeats=3):
    """Reference vs chunked on CPU: time of forward + backward, useful TFLOP/s, peak resident memory."""
    device, clock = torch.device("cpu"), _Clock(torch.device("cpu"), repeats)
    columns = ["B", "N", "D", "provider", "fwd+bwd ms", "TFLOP/s", "peak MiB", "note"]
    print(f"InfoNCE forward + backward on CPU ({torch.get_num_threads()} threads), fp32, tau = 0.03; "
          f"peak = resident memory added (VmHWM); TFLOP/s counts 6 B N D", flush=True)
    rows = []
    for B, h, D in shapes:
        N = B * (1 + h)
        a, p, n = _embeddings(B, h, D, torch.float32, device)
        for name, fn in (("reference", infonce_reference), ("chunked", infonce_chunked)):
            row = dict(B=B, N=N, D=D, provider=name)
            need, available = _eager_bytes(B, N), _available_bytes(device)
            if name == "reference" and need > available:
                row["note"] = f"refused: needs ~{need / 2**30:.0f} GiB, {available / 2**30:.0f} GiB available"
            else:
                if (B, h, D) == CPU_BIG_SHAPE:
                    print(f"{name}: one forward + backward at B = N = {B}, D = {D} (a minute or more) ...", flush=True)
                runs = []

                def timed():
                    start = time.perf_counter()
                    _loss_and_grads(fn, a, p, n)
                    runs.append(time.perf_counter() - start)

                row["peak MiB"] = peak_rss_bytes(timed) / 2**20
                for _ in range(repeats - 1 if (B, h, D) != CPU_BIG_SHAPE else 0):
                    timed()
                seconds = statistics.median(runs)
                row.update({"fwd+bwd ms": 1e3 * seconds, "TFLOP/s": 6 * B * N * D / seconds / 1e12})
                if name == "chunked" and (B, h, D) == CPU_BIG_SHAPE:
                    row["note"] = f"one run; the reference would need {need / 2**30:.0f} GiB"
            print(" ".join(f"{c}={_fmt(row[c])}" for c in columns if c in row), flush=True)
            rows.append(row)
        del a, p, n
    print("\n" + _markdown(rows, columns))
    return rows


# ----------------------------------------------------------------------------- GPU report

class _Budget:
    """Wall-clock allowances, so that the report ends on time: per provider, and a section deadline."""

    def __init__(self, plan):
        self.start, self.plan, self.spent = time.perf_counter(), plan, {}

    def elapsed(self):
        return time.perf_counter() - self.start

    def skip_reason(self, provider, until_s):
        if self.elapsed() > until_s:
            return "skipped: report time budget"
        limit = self.plan.compile_budget_s if "compile" in provider else self.plan.provider_budget_s
        if self.spent.get(provider, 0.0) > limit:
            return f"skipped: {provider} used its {limit:.0f} s budget"
        return None

    def spend(self, provider, seconds):
        self.spent[provider] = self.spent.get(provider, 0.0) + seconds


_compiled_reference = None


def _compiled_infonce(a, p, n):
    global _compiled_reference
    if _compiled_reference is None:
        _compiled_reference = torch.compile(infonce_reference)
    return _compiled_reference(a, p, n)


def _eager_16bit(a, p, n, temperature=0.03):
    """What training code often writes: the logits from a 16-bit matmul, upcast for the cross-entropy."""
    logits = (a @ _candidates(p, n).T).float() / temperature
    return F.cross_entropy(logits, torch.arange(len(a), device=a.device))


def _inf_cl_provider():
    try:
        from inf_cl import cal_inf_loss
    except ImportError:
        return None

    def run(a, p, n, temperature=0.03):  # inf_cl: cal_inf_loss(q, k, labels=arange, scale=1, head_dim)
        head_dim = next((d for d in (256, 128, 64, 32, 16) if a.shape[1] % d == 0), None)
        if head_dim is None:
            raise ValueError("inf_cl needs D divisible by 16")
        return cal_inf_loss(a / temperature, _candidates(p, n), head_dim=head_dim)
    return run


def _liger_provider():
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    loss_fn = LigerFusedLinearCrossEntropyLoss()

    def run(a, p, n, temperature=0.03):  # InfoNCE as a "linear layer + CE": input a / tau, weight = candidates
        out = loss_fn(_candidates(p, n), a / temperature, torch.arange(len(a), device=a.device))
        return out[0] if isinstance(out, tuple) else out
    return run


def _infonce_providers(device, dtype, dry_run):
    """(name, fn or None, why not) for every implementation the report compares."""
    providers = [("eager reference (fp32 logits)", infonce_reference, None)]
    if dtype != torch.float32:
        providers.append(("eager (16-bit matmul)", _eager_16bit, None))
    providers.append(("torch.compile(reference)", _compiled_infonce, "skipped in the dry run" if dry_run else None))
    providers.append(("chunked (PyTorch)", infonce_chunked, None))
    for config in triton_configs(device, dtype):
        providers.append((f"triton {config}", lambda a, p, n, config=config: infonce_triton(a, p, n, config=config), None))
    for name, make in (("inf_cl", _inf_cl_provider), ("liger_kernel FLCE", _liger_provider)):
        fn = make() if device.type == "cuda" else None
        providers.append((name, fn, None if fn else ("not installed" if device.type == "cuda" else "CUDA only")))
    return providers


def _truth(a, p, n, device):
    """Loss and fp32 gradients of the fp32 reference on fp32 copies; the chunked path when that won't fit."""
    copies = [None if t is None else t.detach().float().requires_grad_() for t in (a, p, n)]
    N = len(p) + (0 if n is None else len(n))
    if _eager_bytes(len(a), N) < min(EAGER_LIMIT_BYTES, 0.9 * _available_bytes(device)):
        try:
            return _loss_and_grads(infonce_reference, *copies), "reference"
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
    return _loss_and_grads(infonce_chunked, *copies), "chunked (reference OOM)"


def _infonce_correctness(device, plan):
    rows = []
    for B, h, D in plan.check_infonce:
        for dtype in plan.check_dtypes:
            a, p, n = _embeddings(B, h, D, dtype, device, seed=B + D)
            truth, _ = _truth(a, p, n, device)
            loss_tol, grad_tol = _TOLERANCE[dtype]
            configs = triton_configs(device, dtype)
            if dtype != plan.bench_dtype or (B, h, D) != plan.check_infonce[-1]:
                configs = configs[:1]  # every config the benchmark times is checked once, at the last shape
            checks = [("chunked", infonce_chunked)] + [
                (f"triton {c}", lambda a, p, n, c=c: infonce_triton(a, p, n, config=c)) for c in configs]
            for name, fn in checks:
                row = dict(B=B, N=B * (1 + h), D=D, dtype=str(dtype).replace("torch.", ""), path=name)
                try:
                    first, second = _loss_and_grads(fn, a, p, n), _loss_and_grads(fn, a, p, n)
                    loss_err, grad_err = _errors(first, truth)
                    same = bool(torch.equal(first[0], second[0]) and all(torch.equal(x, y) for x, y in zip(first[1], second[1])))
                    ok = loss_err <= loss_tol and grad_err <= grad_tol and (same or not name.startswith("triton"))
                    row.update({"loss abs err": loss_err, "grad rel err": grad_err, "tolerance": f"{loss_tol:g} / {grad_tol:g}",
                                "bitwise repeatable": "yes" if same else "no", "result": "PASS" if ok else "FAIL"})
                except Exception as e:  # report, never crash: this runs once with a hard time limit
                    row.update({"result": "FAIL", "note": f"{type(e).__name__}: {str(e)[:120]}"})
                rows.append(row)
                print("  ".join(f"{k}={_fmt(v)}" for k, v in row.items()), flush=True)
    return rows


def _padding_mask(B, T, device, side, seed=0):
    """int64 mask (as tokenizers return) with random lengths in [1, T], row 0 a single token. side:
    'left', 'right', or 'mixed' (even rows left-padded, odd rows right-padded)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    lengths[0] = 1
    positions = torch.arange(T)
    right = (positions[None, :] < lengths[:, None]).long()
    left = (positions[None, :] >= T - lengths[:, None]).long()
    use_left = torch.full((B, 1), side == "left") if side != "mixed" else (torch.arange(B)[:, None] % 2 == 0)
    return torch.where(use_left, left, right).to(device)


def _pool_correctness(device, plan):
    rows = []
    cases = [(dtype, mode, side, True) for dtype in plan.check_dtypes for mode in ("last", "mean") for side in ("left", "right")]
    cases += [(plan.check_dtypes[-1], mode, "mixed", False) for mode in ("last", "mean")]
    for B, T, D in plan.check_pool:
        for dtype, mode, side, normalize in cases:
            row = dict(B=B, T=T, D=D, dtype=str(dtype).replace("torch.", ""), mode=mode, padding=side, normalize=normalize)
            try:
                mask = _padding_mask(B, T, device, side, seed=T)
                hidden = torch.randn((B, T, D), generator=torch.Generator(device=device).manual_seed(D), device=device).to(dtype)
                grad_out = torch.randn((B, D), device=device)
                results = []
                for fn, h in ((pool_reference, hidden.float()), (lambda *args: TritonPool.apply(*args[:2], args[2] == "mean", args[3]), hidden)):
                    h = h.detach().requires_grad_()
                    out = fn(h, mask, mode, normalize)
                    (grad,) = torch.autograd.grad(out, h, grad_out.to(out.dtype))
                    results.append((out.detach().float(), grad.float()))
                (ref_out, ref_grad), (out, grad) = results
                out_err = ((out - ref_out).abs().max() / ref_out.abs().max()).item()
                grad_err = ((grad - ref_grad).abs().max() / ref_grad.abs().max()).item()
                tol = _POOL_TOLERANCE[dtype]
                row.update({"out rel err": out_err, "grad rel err": grad_err, "tolerance": tol,
                            "result": "PASS" if max(out_err, grad_err) <= tol else "FAIL"})
            except Exception as e:
                row.update({"result": "FAIL", "note": f"{type(e).__name__}: {str(e)[:120]}"})
            rows.append(row)
            print("  ".join(f"{k}={_fmt(v)}" for k, v in row.items()), flush=True)
    return rows


def _infonce_benchmark(device, plan, budget, dry_run):
    clock, dtype, rows = _Clock(device, repeats=2), plan.bench_dtype, []
    providers = _infonce_providers(device, dtype, dry_run)
    for B, h, D in plan.infonce:
        N = B * (1 + h)
        if budget.elapsed() > plan.infonce_until_s:
            rows.append(dict(B=B, h=h, N=N, D=D, note="skipped: report time budget"))
            continue
        a, p, n = _embeddings(B, h, D, dtype, device)
        truth, truth_name = _truth(a, p, n, device)
        candidates = _candidates(p, n).detach()
        with torch.no_grad():
            matmul_ms = clock.ms(lambda: a.detach() @ candidates.T)  # the same-shape product, in the input dtype
        for name, fn, why_not in providers:
            row = dict(B=B, h=h, N=N, D=D, provider=name)
            eager = name.startswith(("eager", "torch.compile"))
            why_not = why_not or budget.skip_reason(name, plan.infonce_until_s) or (
                eager and _eager_bytes(B, N) > EAGER_LIMIT_BYTES and "skipped: est. memory > 100 GB")
            if why_not:
                row["note"] = why_not
            else:
                start = time.perf_counter()
                try:
                    result = []
                    extra = clock.peak_bytes(lambda: result.append(_loss_and_grads(fn, a, p, n)))
                    loss_err, grad_err = _errors(result[0], truth)
                    del result
                    with torch.no_grad():
                        fwd_ms = clock.ms(lambda: fn(a, p, n))
                    full_ms = clock.ms(lambda: _loss_and_grads(fn, a, p, n))
                    row.update({"fwd ms": fwd_ms, "fwd+bwd ms": full_ms, "extra peak MiB": extra / 2**20,
                                "TFLOP/s": 6 * B * N * D / full_ms / 1e9, "x (3 matmul)": full_ms / (3 * matmul_ms),
                                "loss err": loss_err, "grad err": grad_err, "vs": truth_name})
                except torch.cuda.OutOfMemoryError:
                    row["note"] = "OOM"
                except Exception as e:  # one broken provider must not end the report
                    row["note"] = f"error: {type(e).__name__}: {str(e)[:100]}"
                for t in (a, p, n):
                    if t is not None:
                        t.grad = None
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                budget.spend(name, time.perf_counter() - start)
            rows.append(row)
            print("  ".join(f"{k}={_fmt(v)}" for k, v in row.items()), flush=True)
        rows.append(dict(B=B, h=h, N=N, D=D, provider=f"matmul {str(dtype).replace('torch.', '')} (B x D @ D x N)", **{"fwd ms": matmul_ms}))
        del a, p, n, truth, candidates
    return rows


def _pool_benchmark(device, plan, budget):
    clock, dtype, rows = _Clock(device, repeats=2, rep_ms=30), plan.bench_dtype, []
    Bs, Ts, Ds = plan.pool_sizes
    for B in Bs:
        for T in Ts:
            for D in Ds:
                size = B * T * D * torch.finfo(dtype).bits // 8
                if size > 20e9 or budget.elapsed() > plan.pool_until_s:
                    rows.append(dict(B=B, T=T, D=D, note="skipped: hidden > 20 GB" if size > 20e9 else "skipped: report time budget"))
                    continue
                hidden = torch.randn((B, T, D), device=device, dtype=dtype).requires_grad_()
                mask = _padding_mask(B, T, device, "mixed", seed=B + T)
                attended, elt, mask_elt = int(mask.sum()), hidden.element_size(), mask.element_size()
                for mode in ("last", "mean"):
                    row = dict(B=B, T=T, D=D, mode=mode)
                    try:
                        read = (B if mode == "last" else attended) * D * elt + B * T * mask_elt
                        fwd_bytes, bwd_bytes = read + B * D * elt, B * T * D * elt + B * D * elt + B * T * mask_elt
                        for name, fn in (("triton", lambda h: TritonPool.apply(h, mask, mode == "mean", True)),
                                         ("torch", lambda h: pool_reference(h, mask, mode, True))):
                            with torch.no_grad():
                                fwd_ms = clock.ms(lambda: fn(hidden))
                            out = fn(hidden)
                            grad_out = torch.randn_like(out)
                            bwd_ms = clock.ms(lambda: torch.autograd.grad(out, hidden, grad_out, retain_graph=True))
                            row.update({f"{name} fwd us": 1e3 * fwd_ms, f"{name} bwd us": 1e3 * bwd_ms})
                            if name == "triton":
                                row.update({"fwd GB/s": fwd_bytes / fwd_ms / 1e6, "bwd GB/s": bwd_bytes / bwd_ms / 1e6})
                            del out
                    except torch.cuda.OutOfMemoryError:
                        row["note"] = "OOM"
                    except Exception as e:
                        row["note"] = f"error: {type(e).__name__}: {str(e)[:100]}"
                    rows.append(row)
                    print("  ".join(f"{k}={_fmt(v)}" for k, v in row.items()), flush=True)
                del hidden, mask
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return rows


def _environment(device, dry_run):
    env = {"torch": torch.__version__, "triton": getattr(triton, "__version__", "not installed"),
           "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    if device.type == "cuda":
        try:
            driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            driver = "unknown"
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=torch.cuda.get_device_name(device), driver=driver, cuda=torch.version.cuda,
                   sms=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1))
    else:
        env.update(gpu="cpu-dry-run" if dry_run else "cpu", driver="n/a", cuda="n/a", threads=torch.get_num_threads())
    return env


def _write_report(outdir, env, sections):
    os.makedirs(outdir, exist_ok=True)
    stem = os.path.join(outdir, re.sub(r"[^A-Za-z0-9._-]+", "-", env["gpu"]).strip("-") or "report")
    lines = [f"# lco_mini.kernels report: {env['gpu']}", "", ", ".join(f"{k}: {v}" for k, v in env.items()), ""]
    for title, columns, rows, notes in sections:
        lines += [f"## {title}", "", *notes, "", _markdown(rows, columns), ""]
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines))
    columns = ["section"] + list(env) + sorted({c for _, cols, rows, _ in sections for r in rows for c in r} - set(env),
                                               key=lambda c: min((cols.index(c) for _, cols, _, _ in sections if c in cols), default=99))
    with open(stem + ".csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        for title, _, rows, _ in sections:
            for r in rows:
                writer.writerow({"section": title, **env, **r})
    return stem


def gpu_report(outdir=None, dry_run=False):
    """Correctness (fp32/bf16/fp16 vs the fp32 reference, determinism), InfoNCE and pooling benchmarks.
    Writes OUTDIR/<gpu>.md and .csv after every section (a time-out still leaves files). dry_run, or no
    CUDA: the same code on CPU with tiny shapes and the Triton interpreter."""
    on_gpu = torch.cuda.is_available() and not dry_run
    if triton is None:
        raise SystemExit("the report needs triton (on CPU: its interpreter)")
    if not on_gpu and not triton_interprets():
        raise RuntimeError("the dry run runs the Triton kernels in the interpreter: set TRITON_INTERPRET=1 before "
                           "triton is imported (`python -m lco_mini.kernels --gpu-report DIR --dry-run` does it)")
    device, plan = torch.device("cuda" if on_gpu else "cpu"), (_GPU_PLAN if on_gpu else _DRY_PLAN)
    env, sections, budget = _environment(device, not on_gpu), [], _Budget(plan)
    print(", ".join(f"{k}: {v}" for k, v in env.items()), flush=True)

    def section(title, columns, rows, notes=()):
        sections.append((title, columns, rows, list(notes)))
        print(f"\n## {title}\n" + "\n".join(notes) + "\n" + _markdown(rows, columns) + "\n", flush=True)
        if outdir:
            _write_report(outdir, env, sections)

    check = ["B", "N", "D", "dtype", "path", "loss abs err", "grad rel err", "tolerance", "bitwise repeatable", "result", "note"]
    section("Correctness: InfoNCE vs the fp32 reference (same inputs)", check, _infonce_correctness(device, plan),
            ["grad rel err = max over anchor/positive/negative of max|g - g_ref| / max|g_ref|; each path ran twice."])
    section("Correctness: pooling vs the fp32 reference", ["B", "T", "D", "dtype", "mode", "padding", "normalize",
            "out rel err", "grad rel err", "tolerance", "result", "note"], _pool_correctness(device, plan))
    bench = ["B", "h", "N", "D", "provider", "fwd ms", "fwd+bwd ms", "extra peak MiB", "TFLOP/s", "x (3 matmul)",
             "loss err", "grad err", "vs", "note"]
    section(f"InfoNCE benchmark ({str(plan.bench_dtype).replace('torch.', '')}, N = B (1 + h), tau = 0.03)", bench,
            _infonce_benchmark(device, plan, budget, not on_gpu),
            ["Median times (" + ("triton.testing.do_bench" if on_gpu else "CPU wall clock") + "); TFLOP/s counts 6 B N D "
             "useful FLOPs per forward + backward; 'x (3 matmul)' = fwd+bwd time / (3 x the same-shape matmul); "
             "extra peak = peak memory above the inputs" + (" (CUDA allocator)." if on_gpu else " (process RSS).")])
    section(f"Pooling benchmark ({str(plan.bench_dtype).replace('torch.', '')}, normalize=True, random left/right padding)",
            ["B", "T", "D", "mode", "triton fwd us", "triton bwd us", "fwd GB/s", "bwd GB/s", "torch fwd us", "torch bwd us", "note"],
            _pool_benchmark(device, plan, budget),
            ["GB/s counts what must move: forward reads the attended rows ('last': one per sequence) and the mask and "
             "writes [B, D]; backward writes the whole [B, T, D] gradient. Triton timed through TritonPool.apply "
             "(no input checks)."])
    print(f"report took {budget.elapsed():.0f} s" + (f"; written to {_write_report(outdir, env, sections)}.md/.csv" if outdir else ""))
    return sections


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m lco_mini.kernels",
        description="Benchmark the InfoNCE loss and pooling. On CPU: reference vs chunked (time, TFLOP/s, peak "
                    "memory). On CUDA: every provider (eager, torch.compile, chunked, Triton, inf_cl, liger_kernel).")
    parser.add_argument("--big", action="store_true", help="CPU: add B = N = 65536, D = 256 (16 GiB of fp32 logits; "
                        "the reference is refused, the chunked loss runs once: a minute or more)")
    parser.add_argument("--repeats", type=int, default=3, help="CPU: timed runs per cell, median reported (default 3)")
    parser.add_argument("--gpu-report", metavar="OUTDIR", help="correctness + benchmark report; writes "
                        "OUTDIR/<gpu-name>.md and OUTDIR/<gpu-name>.csv (about 6 minutes on an H200)")
    parser.add_argument("--dry-run", action="store_true", help="with --gpu-report: run the report's code on CPU "
                        "with tiny shapes and the Triton interpreter (to test it without a GPU)")
    args = parser.parse_args(argv)
    if args.dry_run and not args.gpu_report:
        parser.error("--dry-run goes with --gpu-report")
    if args.gpu_report and not torch.cuda.is_available() and not args.dry_run:
        print("no CUDA device: running the report as a dry run on CPU", file=sys.stderr)
        args.dry_run = True
    if args.dry_run and triton is not None and not triton_interprets():  # switch the interpreter on: start again
        os.execve(sys.executable, [sys.executable, "-m", "lco_mini.kernels"] + list(argv if argv is not None else sys.argv[1:]),
                  {**os.environ, "TRITON_INTERPRET": "1"})
    if args.gpu_report:
        gpu_report(args.gpu_report, dry_run=args.dry_run)
    elif torch.cuda.is_available():
        gpu_report(None)
    else:
        cpu_benchmark(CPU_SHAPES + ([CPU_BIG_SHAPE] if args.big else []), max(1, args.repeats))


if __name__ == "__main__":
    main()
