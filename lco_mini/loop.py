"""The bookkeeping around a training loop: AdamW on the trainable weights, the lr schedule,
gradient averaging and clipping, a stop on a non-finite loss, resume, log lines, atomic
checkpoints and the time each phase of a step takes. What a step computes stays in train.py's
loops, where a reader sees it.
"""
from __future__ import annotations

import contextlib
import math
import time
from collections import defaultdict
from pathlib import Path

import torch

from lco_mini.support import checkpoint, distributed
from lco_mini.support.distributed import say


class TrainingError(RuntimeError):
    """Stops a run with a message (bad loss, bad data); the last good checkpoint is kept."""


def get_lr(step: int, peak: float, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def rate_text(rate: float) -> str:
    """Items per second for a log line: one decimal from 10 on, else three significant digits
    (a 3B model on a CPU trains ~0.05 pairs/s, which one decimal would print as 0.1 or 0.0)."""
    return f"{rate:6.1f}" if rate >= 10 else f"{rate:6.3g}"


def _wait_for_gpu() -> None:
    """CUDA runs asynchronously: without this a phase would end when its kernels were queued."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class PhaseTimer:
    """Wall-clock seconds per named phase of a step (data, processor, forward, ...), summed over steps."""

    def __init__(self):
        self.seconds = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, phase: str):
        _wait_for_gpu()
        start = time.perf_counter()
        try:
            yield
        finally:
            _wait_for_gpu()
            self.seconds[phase] += time.perf_counter() - start

    def summary(self, steps: int) -> str:
        """One line: ms per step and share of each phase, in the order they ran."""
        total = sum(self.seconds.values())
        parts = [f"{phase} {1000 * s / max(1, steps):.0f} ms ({100 * s / max(total, 1e-9):.0f}%)"
                 for phase, s in self.seconds.items()]
        return f"{1000 * total / max(1, steps):.0f} ms/step = " + ", ".join(parts)


class Run:
    """One stage's bookkeeping (see the module docstring); train.py's run_pretrain and
    run_contrastive hold the loops themselves."""

    def __init__(self, name: str, model, args, ckpt_path: Path, steps: int, peak_lr: float, warmup: int,
                 items_per_step: int, unit: str, log_extra: str = ""):
        self.name, self.model, self.args, self.ckpt_path = name, model, args, ckpt_path
        self.steps, self.peak_lr, self.warmup = steps, peak_lr, warmup
        self.items_per_step, self.unit, self.log_extra = items_per_step, unit, log_extra
        self.params = [p for p in model.parameters() if p.requires_grad]
        # fused: one kernel for all weights instead of a loop of small ops (3x faster on a CPU)
        fused = all(p.device.type in ("cpu", "cuda") for p in self.params)
        self.optimizer = torch.optim.AdamW(self.params, lr=peak_lr, weight_decay=args.weight_decay, fused=fused)
        self.start, self.losses = 0, []
        self.timed = PhaseTimer()  # `with run.timed("forward"): ...` in the loops

    def resume(self) -> range:
        """The steps left to run: all of them, or (with --resume) those after the checkpoint."""
        state = checkpoint.load(self.ckpt_path) if self.args.resume else None
        if state is not None:
            checkpoint.load_trainable(self.model, state, self.ckpt_path)
            try:
                self.optimizer.load_state_dict(state["optimizer"])
            except (ValueError, KeyError) as e:
                raise checkpoint.CheckpointError(f"{self.ckpt_path}: its optimizer state does not fit ({e})") from None
            checkpoint.set_rng_state(state["rng"])
            self.start, self.losses = state["step"], state["losses"]
            say(f"{self.name}: resumed from {self.ckpt_path} at step {self.start}")
        self.t0 = time.time()
        return range(self.start, self.steps)

    def set_lr(self, step: int) -> float:
        lr = get_lr(step, self.peak_lr, self.warmup, self.steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def optimizer_step(self, step: int, loss: torch.Tensor) -> None:
        """After backward: stop on a non-finite loss, average gradients over processes, clip, step."""
        with self.timed("optimizer"):
            if not torch.isfinite(loss):
                raise TrainingError(f"{self.name}: loss became {loss.item()} at step {step}; stopping. The last "
                                    f"good checkpoint is kept in {self.ckpt_path} (try a lower --lr)")
            distributed.average_gradients(self.params)
            if self.args.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.params, self.args.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.losses.append(loss.item())

    def log_and_checkpoint(self, step: int, lr: float) -> None:
        last_step = step == self.steps - 1
        if step == self.start and not last_step:
            self.timed.seconds.clear()  # the phase split leaves out the first step (one-time warm-up)
        if step % self.args.log_every == 0 or last_step:
            rate = (step + 1 - self.start) * self.items_per_step / max(1e-9, time.time() - self.t0)
            say(f"{self.name} step {step:5d} | loss {self.losses[-1]:.4f} | lr {lr:.2e} | "
                f"{rate_text(rate)} {self.unit}/s{self.log_extra}")
        if last_step:
            timed_steps = max(1, self.steps - self.start - 1)
            say(f"{self.name}: where a step's time went (mean of {timed_steps} steps): {self.timed.summary(timed_steps)}")
        if ((step + 1) % self.args.ckpt_every == 0 or last_step) and distributed.is_main():
            checkpoint.save({"model": checkpoint.trainable_state(self.model), "optimizer": self.optimizer.state_dict(),
                             "rng": checkpoint.rng_state(), "step": step + 1, "losses": self.losses,
                             "config": vars(self.args), "stage": self.name}, self.ckpt_path)
