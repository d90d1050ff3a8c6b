"""Measuring tools for the kernel benchmarks: a clock with medians, peak memory, test inputs, errors, tables.

Shared by the CPU benchmark (bench/kernels.py) and the GPU report (bench/gpu_report.py); the
library never imports it.
  peak_rss_bytes(fn)        resident memory fn() adds at its peak (Linux, CPU)
  Clock(device)             .ms(fn): median time (do_bench on CUDA); .peak_bytes(fn): extra peak memory
  available_bytes(device)   free memory now; eager_bytes(B, N): what the eager reference InfoNCE needs
  embeddings(B, h, D, ...)  unit-norm anchors, positives, hard negatives
  loss_and_grads, errors    one forward + backward; its errors against a reference run
  fmt, markdown             table cells and markdown tables
"""
import ctypes
import gc
import statistics
import time

import torch
import torch.nn.functional as F


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


def available_bytes(device):
    """Free memory in bytes: on the GPU (CUDA's free memory) or, on CPU, the kernel's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


def eager_bytes(B, N):
    """The eager reference holds about four B x N fp32 matrices: logits, log-softmax and two gradients."""
    return 4 * 4 * B * N


def embeddings(B, h, D, dtype, device, seed=0):
    """Unit-norm anchors, positives and B*h hard negatives (None when h = 0), as leaf tensors."""
    gen = torch.Generator(device=device).manual_seed(seed)
    x = F.normalize(torch.randn(((2 + h) * B, D), generator=gen, device=device), dim=-1).to(dtype)
    a, p, n = (t.clone().requires_grad_() for t in (x[:B], x[B:2 * B], x[2 * B:]))
    return a, p, (n if h else None)


def loss_and_grads(fn, a, p, n):
    """Run loss = fn(a, p, n) and its backward -> (fp32 loss, fp32 gradients of the leaves a, p and n if given)."""
    leaves = [t for t in (a, p, n) if t is not None]
    for t in leaves:
        t.grad = None
    loss = fn(a, p, n)
    loss.backward()
    return loss.detach().float(), [t.grad.float() for t in leaves]


def errors(result, truth):
    """(|loss - loss_ref|, max over tensors of max|g - g_ref| / max|g_ref|)."""
    (loss, grads), (ref_loss, ref_grads) = result, truth
    grad_err = max(((g - r).abs().max() / r.abs().max().clamp_min(1e-30)).item() for g, r in zip(grads, ref_grads))
    return abs(loss - ref_loss).item(), grad_err


class Clock:
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


def fmt(x):
    """A table cell: floats to about 3 significant digits (no decimals from 100 up), anything else as str."""
    if isinstance(x, float):
        return f"{x:.0f}" if abs(x) >= 100 else f"{x:.1f}" if abs(x) >= 10 else f"{x:.3g}"
    return str(x)


def markdown(rows, columns):
    """A markdown table of rows (dicts) in the given column order; missing cells stay empty."""
    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    line = lambda items: "| " + " | ".join(s.ljust(w) for s, w in zip(items, widths)) + " |"  # noqa: E731
    return "\n".join([line(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in cells])
