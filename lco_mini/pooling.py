"""Pooling for LCO-Emb: hidden states [B, T, D] -> one L2-normalised vector per row.

LCO-Emb embeds an input as the hidden state of its last attended token (the position that would
predict the answer to "Summarize the above ... in one word:"). pool(mode="last") finds that token
for left and right padding alike; mode="mean" is the masked mean, the other common choice. Both
then L2-normalise with F.normalize's semantics.

Two implementations give the same numbers (tests/test_kernels.py):
  reference  a few lines of PyTorch: the ground truth, and the path on CPU.
  triton     the span of the mask per row, masked sums over (row, D block, piece of T) programs,
             then one program per row that divides or gathers and normalises; one backward kernel
             writes the dense gradient. Never builds a masked [B, T, D] copy.
backend="auto" picks Triton for CUDA tensors (the plumbing, lco_mini/triton_support.py, is shared with
the InfoNCE loss in lco_mini/infonce.py).
"""
import torch
import torch.nn.functional as F

from lco_mini.triton_support import TRITON_DTYPES, accumulation_dtype, choose_path, launcher, tl, triton

NORMALIZE_EPS = 1e-12  # F.normalize's default


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
    def _pool_span_kernel(
        mask_ptr,  # [B, T] attention mask (any int or float dtype; nonzero = attended), unit stride along T
        span_ptr,  # [3, B] int32 out: first attended position, last attended position, number attended
        B, T, stride_mb, BLOCK_T: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        first_seen = tl.full([BLOCK_T], 2147483647, tl.int32)
        last_seen = tl.full([BLOCK_T], -1, tl.int32)
        n_seen = tl.zeros([BLOCK_T], tl.int32)
        for t0 in range(0, T, BLOCK_T):
            ts = t0 + tl.arange(0, BLOCK_T)
            attended = tl.load(mask_ptr + row * stride_mb + ts, mask=ts < T, other=0) != 0
            first_seen = tl.minimum(first_seen, tl.where(attended, ts, 2147483647))
            last_seen = tl.maximum(last_seen, tl.where(attended, ts, -1))
            n_seen += attended.to(tl.int32)
        tl.store(span_ptr + row, tl.min(first_seen, axis=0))
        tl.store(span_ptr + B + row, tl.max(last_seen, axis=0))
        tl.store(span_ptr + 2 * B + row, tl.sum(n_seen, axis=0))

    @triton.jit
    def _pool_sum_kernel(
        hidden_ptr,  # [B, T, D] hidden states, unit stride along D
        mask_ptr,  # [B, T] attention mask, unit stride along T
        span_ptr,  # [3, B] int32: first, last attended position, count (from _pool_span_kernel)
        partial_ptr,  # [S, B, D] out (fp32, fp64 for fp64 inputs): this piece's sum of attended rows
        B, T, D, stride_hb, stride_ht, stride_mb, n_pieces,
        BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # grid (row, D block, piece): piece p of a row sums the p-th of n_pieces equal slices of the row's
        # attended span [first, last], so that even 8 rows keep every SM busy
        row = tl.program_id(0).to(tl.int64)
        dims = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        dim_ok = dims < D
        first, last = tl.load(span_ptr + row), tl.load(span_ptr + B + row)
        per_piece = tl.cdiv(tl.cdiv(last + 1 - first, BLOCK_T), n_pieces) * BLOCK_T
        start = first + tl.program_id(2) * per_piece
        stop = tl.minimum(start + per_piece, last + 1)
        # the mask only weights the rows: hidden loads do not wait for it, so both stream at once. Padding
        # outside [first, last] is never read; holes inside the span (rare) are read and weighted 0.
        total = tl.zeros([BLOCK_T, BLOCK_D], partial_ptr.dtype.element_ty)  # reduced over T once, at the end
        for t0 in range(start, stop, BLOCK_T):
            ts = t0 + tl.arange(0, BLOCK_T)
            in_span = ts < stop
            attended = tl.load(mask_ptr + row * stride_mb + ts, mask=in_span, other=0) != 0
            h = tl.load(hidden_ptr + row * stride_hb + ts[:, None].to(tl.int64) * stride_ht + dims[None, :],
                        mask=in_span[:, None] & dim_ok[None, :], other=0.0)
            total += tl.where(attended[:, None], h.to(partial_ptr.dtype.element_ty), 0.0)
        tl.store(partial_ptr + (tl.program_id(2) * B + row) * D + dims, tl.sum(total, axis=0), mask=dim_ok)

    @triton.jit
    def _pool_finish_kernel(
        hidden_ptr,  # [B, T, D] hidden states, unit stride along D ("last" gathers from it)
        partial_ptr,  # [S, B, D] the pieces' sums ("mean")
        span_ptr,  # [3, B] int32: first, last attended position, count
        pooled_ptr,  # [B, D] out (fp32, fp64 for fp64 inputs): the pooled vector, before normalisation
        out_ptr,  # [B, D] out, in the hidden states' dtype: pooled / max(||pooled||, eps), or pooled
        norm_ptr,  # [B] out: ||pooled|| (for the backward)
        B, D, stride_hb, stride_ht, n_pieces, eps,
        MEAN: tl.constexpr, NORMALIZE: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        acc_dtype = pooled_ptr.dtype.element_ty
        last = tl.load(span_ptr + B + row).to(tl.int64)
        count = tl.load(span_ptr + 2 * B + row).to(acc_dtype)
        sum_sq = tl.zeros([BLOCK_D], acc_dtype)
        for d0 in range(0, D, BLOCK_D):
            dims = d0 + tl.arange(0, BLOCK_D)
            if MEAN:  # add the pieces up in a fixed order (deterministic), then divide
                x = tl.zeros([BLOCK_D], acc_dtype)
                for piece in range(0, n_pieces):
                    x += tl.load(partial_ptr + (piece * B + row) * D + dims, mask=dims < D, other=0.0)
                x = x / count
            else:  # the hidden state of the last attended token
                x = tl.load(hidden_ptr + row * stride_hb + last * stride_ht + dims, mask=dims < D, other=0.0).to(acc_dtype)
            tl.store(pooled_ptr + row * D + dims, x, mask=dims < D)
            sum_sq += x * x
        norm = tl.sqrt(tl.sum(sum_sq, axis=0))
        tl.store(norm_ptr + row, norm)
        denominator = tl.maximum(norm, eps) if NORMALIZE else 1.0
        tl.debug_barrier()  # every thread's part of pooled is written before any is read back
        for d0 in range(0, D, BLOCK_D):
            dims = d0 + tl.arange(0, BLOCK_D)
            x = tl.load(pooled_ptr + row * D + dims, mask=dims < D, other=0.0)
            tl.store(out_ptr + row * D + dims, (x / denominator).to(out_ptr.dtype.element_ty), mask=dims < D)

    @triton.jit
    def _pool_bwd_kernel(
        grad_out_ptr,  # [B, D] gradient of the pooled output, contiguous
        pooled_ptr,  # [B, D] pooled vectors from the forward
        norm_ptr,  # [B] their norms
        mask_ptr,  # [B, T] attention mask, unit stride along T
        span_ptr,  # [3, B] int32: first, last attended position, count
        grad_hidden_ptr,  # [B, T, D] out, contiguous: every element is written (zeros included)
        B, T, D, stride_mb, eps,
        MEAN: tl.constexpr, NORMALIZE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        acc_dtype = pooled_ptr.dtype.element_ty
        ts = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
        t_ok = ts < T
        # how much of d(pooled) each of this program's positions receives
        if MEAN:
            attended = tl.load(mask_ptr + row * stride_mb + ts, mask=t_ok, other=0) != 0
            weight = attended.to(acc_dtype) / tl.load(span_ptr + 2 * B + row).to(acc_dtype)
        else:
            weight = (ts == tl.load(span_ptr + B + row)).to(acc_dtype)
        # backward of y = u / max(||u||, eps): du = (dy - y (y . dy)) / ||u||, or dy / eps where clamped
        norm = tl.load(norm_ptr + row)
        denominator = tl.maximum(norm, eps) if NORMALIZE else 1.0
        y_dot_dy = tl.zeros([BLOCK_D], acc_dtype)
        if NORMALIZE:
            for d0 in range(0, D, BLOCK_D):
                dims = d0 + tl.arange(0, BLOCK_D)
                y = tl.load(pooled_ptr + row * D + dims, mask=dims < D, other=0.0) / denominator
                y_dot_dy += y * tl.load(grad_out_ptr + row * D + dims, mask=dims < D, other=0.0).to(acc_dtype)
        projection = tl.where(norm > eps, tl.sum(y_dot_dy, axis=0), 0.0)
        for d0 in range(0, D, BLOCK_D):
            dims = d0 + tl.arange(0, BLOCK_D)
            dy = tl.load(grad_out_ptr + row * D + dims, mask=dims < D, other=0.0).to(acc_dtype)
            y = tl.load(pooled_ptr + row * D + dims, mask=dims < D, other=0.0) / denominator
            d_pooled = (dy - y * projection) / denominator if NORMALIZE else dy
            g = weight[:, None] * d_pooled[None, :]
            tl.store(grad_hidden_ptr + (row * T + ts[:, None].to(tl.int64)) * D + dims[None, :],
                     g.to(grad_hidden_ptr.dtype.element_ty), mask=t_ok[:, None] & (dims[None, :] < D))


def _pool_blocks(device):
    """(BLOCK_T, BLOCK_D) of the sum and backward kernels: small in the interpreter, 16 KB of bf16 per tile
    on GPU (enough loads in flight per program to approach the memory bandwidth)."""
    return (16, 16) if device.type != "cuda" else (64, 128)


def _pool_pieces(programs, t_blocks, device):
    """Pieces per row for the masked sum: enough for (rows x D blocks x pieces) to fill the GPU 4 times over."""
    target = 4 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 64
    return max(1, min(t_blocks, -(-target // programs)))


class TritonPool(torch.autograd.Function):
    """Pooling + L2 normalisation with Triton. Forward: the mask's span per row, then ("mean") masked sums
    over (row, D block, piece of T) programs, then one program per row adds the pieces, divides (mean) or
    gathers the last token ("last") and normalises. Backward: one kernel writes the dense gradient."""

    @staticmethod
    def forward(ctx, hidden, attention_mask, mean, normalize):
        if hidden.stride(-1) != 1:
            hidden = hidden.contiguous()
        mask = attention_mask.contiguous()
        mask = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
        (B, T, D), device = hidden.shape, hidden.device
        block_t, block_d = _pool_blocks(device)
        acc_dtype = accumulation_dtype(hidden.dtype)
        span = torch.empty((3, B), dtype=torch.int32, device=device)
        launcher(_pool_span_kernel)[(B,)](mask, span, B, T, mask.stride(0), BLOCK_T=16 * block_t)
        pieces, partial = 1, span  # span stands in for the unused partial sums of "last"
        if mean:
            d_blocks = triton.cdiv(D, block_d)
            pieces = _pool_pieces(B * d_blocks, triton.cdiv(T, block_t), device)
            partial = torch.empty((pieces, B, D), dtype=acc_dtype, device=device)
            launcher(_pool_sum_kernel)[(B, d_blocks, pieces)](
                hidden, mask, span, partial, B, T, D, hidden.stride(0), hidden.stride(1), mask.stride(0), pieces,
                BLOCK_T=block_t, BLOCK_D=block_d)
        pooled = torch.empty((B, D), dtype=acc_dtype, device=device)
        out = torch.empty((B, D), dtype=hidden.dtype, device=device)
        norm = torch.empty(B, dtype=acc_dtype, device=device)
        launcher(_pool_finish_kernel)[(B,)](
            hidden, partial, span, pooled, out, norm, B, D, hidden.stride(0), hidden.stride(1), pieces, NORMALIZE_EPS,
            MEAN=mean, NORMALIZE=normalize, BLOCK_D=4 * block_d)
        ctx.save_for_backward(mask, pooled, norm, span)
        ctx.mean, ctx.normalize, ctx.hidden_shape, ctx.hidden_dtype = mean, normalize, hidden.shape, hidden.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        mask, pooled, norm, span = ctx.saved_tensors
        B, T, D = ctx.hidden_shape
        block_t, block_d = _pool_blocks(pooled.device)
        block_t = min(block_t, 32)  # the backward only writes: 32 x 128 tiles reach 80-89% of an H200's copy bandwidth (docs/bench/)
        grad_hidden = torch.empty(ctx.hidden_shape, dtype=ctx.hidden_dtype, device=pooled.device)
        launcher(_pool_bwd_kernel)[(B, triton.cdiv(T, block_t))](
            grad_out.contiguous(), pooled, norm, mask, span, grad_hidden, B, T, D, mask.stride(0), NORMALIZE_EPS,
            MEAN=ctx.mean, NORMALIZE=ctx.normalize, BLOCK_T=block_t, BLOCK_D=block_d)
        return grad_hidden, None, None, None


def pool(hidden, attention_mask, mode="last", normalize=True, backend="auto"):
    """Pool hidden states [B, T, D] to [B, D]: mode "last" (last attended token, any padding side) or
    "mean" (masked mean), then L2-normalise (F.normalize semantics) when normalize is True.

    backend: "auto" | "reference" | "triton"; "chunked" is accepted and means the PyTorch reference
    (pooling has no large intermediate to chunk). A row with no attended token is a ValueError.
    """
    _check_pool_inputs(hidden, attention_mask, mode)
    path = choose_path("pool", backend, hidden.device, "reference")
    if path in ("reference", "chunked"):
        return pool_reference(hidden, attention_mask, mode, normalize)
    if hidden.dtype not in TRITON_DTYPES + (torch.float64,):
        raise TypeError(f"the Triton pooling takes fp32/bf16/fp16/fp64; got {hidden.dtype}")
    return TritonPool.apply(hidden, attention_mask, mode == "mean", normalize)
