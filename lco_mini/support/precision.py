"""Mixed precision: bf16 arithmetic where the hardware does it natively, fp32 trained weights.

train.py keeps the weights it trains and their AdamW state in fp32 (bf16 would round small updates away)
and runs each forward pass under torch.autocast: matmuls in bf16, reductions and norms in fp32.
That pays only where bf16 matmuls are native:
  * CUDA GPUs (bf16 tensor cores);
  * x86 CPUs with AVX512-BF16 or AMX-BF16, where a bf16 matmul runs as fast as an fp32 one or
    faster (about three times on an AMD EPYC, about the same on an Intel Xeon) on half the memory.
Elsewhere bf16 is emulated and slower than fp32, so "auto" picks fp32 there. `--precision fp32`
turns autocast off; the tests run in fp32 (LCO_MINI_PRECISION=fp32, set by tests/conftest.py).
On CUDA the frozen base of the contrastive stages, a real backbone's weights and the models the
evaluation loads are bf16 whatever --precision says (backbone.load's default there). On a CPU they
are bf16 when the run computes in bf16 and the checkpoint is stored in bf16, as every hub MLLM is
(load_dtype): a 3B model then holds ~7-9 GB instead of the ~15-19 GB of an fp32 copy, and autocast
would round each fp32 weight to bf16 at every matmul anyway. The tiny model is stored in fp32 and
stays fp32, as everything does under --precision fp32.

Training every weight (the tiny model's pretraining from scratch) goes one step further: the
steps run on a bf16 copy of the model (Bf16Copy), whose gradients are handed to the fp32 model
for AdamW. Autocast casts every weight and activation at every op; a model that is bf16
throughout skips those casts, which take a sixth of a tiny pretraining step's forward + backward
(`python train.py --profile-steps 8` shows where a step's time goes).
The contrastive loss is always computed in fp32 on fp32 embeddings: at temperature 0.03 a bf16
similarity (3 significant digits) would move the logits by ~0.1.
"""
from __future__ import annotations

import contextlib
import copy
import os
from pathlib import Path

import torch

CHOICES = ("auto", "bf16", "fp32")
DEFAULT = os.environ.get("LCO_MINI_PRECISION", "auto")  # the tests pin fp32 this way
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of native bf16 matmuls


def cpu_bf16_flag(cpuinfo: str | None = None) -> str | None:
    """The first native-bf16 flag this CPU reports (Linux /proc/cpuinfo), or None."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text(errors="replace") if path.exists() else ""
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    return next((flag for flag in CPU_BF16_FLAGS if flag in flags), None)


def choose(requested: str, device: torch.device, cpuinfo: str | None = None,
           cuda_native: bool | None = None) -> tuple[str, str]:
    """("bf16" or "fp32", why) for --precision `requested` on `device`. cpuinfo / cuda_native:
    what the hardware reports (read here when None; tests pass them)."""
    if requested not in CHOICES:
        raise ValueError(f"precision must be one of {', '.join(CHOICES)}; got {requested!r}")
    if requested != "auto":
        return requested, "asked for"
    if device.type == "cuda":
        if cuda_native is None:
            cuda_native = torch.cuda.is_bf16_supported(including_emulation=False)
        return ("bf16", "CUDA with bf16 tensor cores") if cuda_native else ("fp32", "this GPU has no native bf16")
    flag = cpu_bf16_flag(cpuinfo) if device.type == "cpu" else None
    if flag:
        return "bf16", f"this CPU has {flag.upper().replace('_', '-')}"
    return "fp32", f"no native bf16 on this {device.type}"


def load_dtype(device: torch.device, precision_used: str, stored_dtype) -> torch.dtype:
    """The dtype backbone.load gives a model when none is asked for: bf16 on CUDA; on a CPU, bf16 when
    precision_used is "bf16" and the checkpoint is stored in bf16 (stored_dtype: its config's dtype),
    else fp32 (see the module docstring)."""
    if device.type == "cuda":
        return torch.bfloat16
    stored_bf16 = str(stored_dtype).removeprefix("torch.") == "bfloat16"
    return torch.bfloat16 if precision_used == "bf16" and stored_bf16 else torch.float32


def autocast(device: torch.device, precision: str):
    """The context of a forward pass: bf16 autocast, or nothing for fp32."""
    if precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


class Bf16Copy:
    """A bf16 copy of `master` to run the forward and backward passes on, while `master` keeps
    the fp32 weights that AdamW updates, checkpoints and saving read (mixed precision with master
    weights, Micikevicius et al. 2018). Per step: backward on the copy, grads_to_master(),
    the optimizer step on master, weights_from_master()."""

    def __init__(self, master: torch.nn.Module):
        self.master = master
        self.model = copy.deepcopy(master).to(torch.bfloat16)
        self.model.train(master.training)

    def grads_to_master(self) -> None:
        """Each bf16 gradient, in fp32, as the gradient of the master weight (None stays None)."""
        for weight, working in zip(self.master.parameters(), self.model.parameters()):
            weight.grad = None if working.grad is None else working.grad.float()
            working.grad = None

    @torch.no_grad()
    def weights_from_master(self) -> None:
        """The updated fp32 weights, rounded to bf16, into the copy."""
        for weight, working in zip(self.master.parameters(), self.model.parameters()):
            working.copy_(weight)
