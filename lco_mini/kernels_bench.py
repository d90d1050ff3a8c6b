"""Benchmarks of lco_mini.infonce (InfoNCE) and lco_mini.pooling; the library does not import this.

    python -m lco_mini.kernels_bench [--threads 1] [--big]       CPU: reference vs chunked InfoNCE (time, memory)
    python -m lco_mini.kernels_bench --gpu-report OUTDIR         CUDA: correctness + benchmarks -> OUTDIR/<gpu>.md/.csv
    python -m lco_mini.kernels_bench --gpu-report OUTDIR --dry-run   the same code on CPU: tiny shapes, interpreter

This file holds the measuring tools (a clock with medians,
peak memory, markdown tables), the CPU table and the command line; the GPU report is lco_mini/gpu_report.py.
"""
import argparse
import ctypes
import gc
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from lco_mini.infonce import infonce_chunked, infonce_reference
from lco_mini.triton_support import triton, triton_interprets

CPU_SHAPES = [(1024, 0, 256), (1024, 3, 256), (4096, 0, 128), (2048, 7, 64), (4096, 7, 128)]  # (B, hard negatives per anchor, D)
CPU_BIG_SHAPE = (65536, 0, 256)  # B = N = 65536: 16 GiB of fp32 logits


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
    device = torch.device("cpu")
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


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m lco_mini.kernels_bench",
        description="Benchmark the InfoNCE loss and pooling. On CPU: reference vs chunked (time, TFLOP/s, peak "
                    "memory). On CUDA: every provider (eager, torch.compile, chunked, Triton, inf_cl, liger_kernel).")
    parser.add_argument("--big", action="store_true", help="CPU: add B = N = 65536, D = 256 (16 GiB of fp32 logits; "
                        "the reference is refused, the chunked loss runs once: a minute or more)")
    parser.add_argument("--repeats", type=int, default=3, help="CPU: timed runs per cell, median reported (default 3)")
    parser.add_argument("--threads", type=int, help="CPU: torch threads (default: torch's choice; on a busy machine "
                        "1 avoids oversubscribed thread pools, which slow the many small matmuls of the chunked path)")
    parser.add_argument("--gpu-report", metavar="OUTDIR", help="correctness + benchmark report; writes "
                        "OUTDIR/<gpu-name>.md and OUTDIR/<gpu-name>.csv (about 3 to 4 minutes on an H200)")
    parser.add_argument("--dry-run", action="store_true", help="with --gpu-report: run the report's code on CPU "
                        "with tiny shapes and the Triton interpreter (to test it without a GPU)")
    args = parser.parse_args(argv)
    if args.dry_run and not args.gpu_report:
        parser.error("--dry-run goes with --gpu-report")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.gpu_report and not torch.cuda.is_available() and not args.dry_run:
        print("no CUDA device: running the report as a dry run on CPU", file=sys.stderr)
        args.dry_run = True
    if args.dry_run and triton is not None and not triton_interprets():  # switch the interpreter on: start again
        args_again = list(argv if argv is not None else sys.argv[1:])
        os.execve(sys.executable, [sys.executable, "-m", "lco_mini.kernels_bench", *args_again, *(["--dry-run"] * ("--dry-run" not in args_again))],
                  {**os.environ, "TRITON_INTERPRET": "1"})
    if args.gpu_report or torch.cuda.is_available():
        from lco_mini.gpu_report import gpu_report  # lazy: it imports this module's measuring tools
        gpu_report(args.gpu_report, dry_run=args.dry_run)
    else:
        cpu_benchmark(CPU_SHAPES + ([CPU_BIG_SHAPE] if args.big else []), max(1, args.repeats))


if __name__ == "__main__":
    main()
