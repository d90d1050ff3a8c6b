"""Multi-process training (torchrun / DDP) and the cross-device negatives of the paper.

Contrastive learning gets better with more negatives, and the negatives of one
process are the embeddings every other process computed. So before the loss each
process gathers all embeddings of the global batch. torch.distributed.all_gather
returns tensors without gradient; we put the local slice (which has one) back in
its place, so each process's loss back-propagates into its own forward pass.
Each process's loss is the mean over its own anchors. The gradients are then averaged
over processes by hand (average_gradients: what DDP would do; torch's DDP wrapper is not
used, so GradCache's several backward passes per step need no no_sync() bookkeeping), and
the loss is scaled by the world size (losses.batch_loss) so that the average is the
gradient of one process on the whole batch (tests/test_distributed.py checks it).
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def setup(device: str | None) -> tuple[torch.device, int, int]:
    """(device, rank, world size). Starts the process group when run under torchrun."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        rank, world_size = dist.get_rank(), dist.get_world_size()
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", 0))
            torch.cuda.set_device(local)
            return torch.device("cuda", local), rank, world_size
        return torch.device("cpu"), rank, world_size
    chosen = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(chosen), 0, 1


def is_main() -> bool:
    return rank() == 0


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate x from every process along dim 0; only the local slice keeps its gradient."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    parts[dist.get_rank()] = x
    return torch.cat(parts)


def say(message: str) -> None:
    """Print on the main process only (every process runs the same script)."""
    if is_main():
        print(message, flush=True)


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def average_gradients(params) -> None:
    """Average .grad over processes (what DDP does; done by hand so GradCache's
    several backward passes per step need no no_sync() bookkeeping).

    Every process must join every all_reduce, so a weight this process's batch did not reach
    (an audio tower when its share had no audio) sends zeros. A flag per weight travels along:
    a weight no process reached keeps .grad None, as in one process, so AdamW leaves it alone.
    All gradients travel as one flat fp32 buffer: one collective per step, not one per tensor."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    reached = torch.tensor([float(p.grad is not None) for p in params], device=params[0].device)
    grads = [p.grad.float().reshape(-1) if p.grad is not None else p.new_zeros(p.numel(), dtype=torch.float32)
             for p in params]
    flat = torch.cat(grads + [reached])
    dist.all_reduce(flat)
    flat[:-len(params)] /= dist.get_world_size()
    chunks = flat[:-len(params)].split([p.numel() for p in params])
    for p, chunk, count in zip(params, chunks, flat[-len(params):].tolist()):
        p.grad = chunk.view_as(p).to(dtype=p.dtype, copy=True) if count > 0 else None


def broadcast_from_main(params) -> None:
    """Give every process rank 0's values (fresh LoRA weights are random: each process would
    draw its own, and the averaged gradients would then update different models)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    for p in params:
        dist.broadcast(p.data, src=0)
