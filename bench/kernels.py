"""The command line of the kernel benchmarks: InfoNCE (lco_mini/infonce.py) and pooling (lco_mini/pooling.py).

    python -m bench.kernels [--threads 1] [--big]       CPU: reference vs chunked InfoNCE (time, memory)
    python -m bench.kernels --gpu-report OUTDIR         CUDA: correctness + benchmarks -> OUTDIR/<gpu>.md/.csv
    python -m bench.kernels --gpu-report OUTDIR --dry-run   the same code on CPU: tiny shapes, interpreter

This file holds the CPU table and the command line; the GPU report is bench/gpu_report.py, the measuring
tools both use (a clock with medians, peak memory, markdown tables) are bench/measure.py. Nothing imports
this file: the library never imports a benchmark.
"""
import argparse
import os
import statistics
import sys
import time

import torch

from bench.gpu_report import gpu_report
from lco_mini.infonce import infonce_chunked, infonce_reference
from bench.measure import available_bytes, eager_bytes, embeddings, fmt, loss_and_grads, markdown, peak_rss_bytes
from lco_mini.triton_support import triton, triton_interprets

CPU_SHAPES = [(1024, 0, 256), (1024, 3, 256), (4096, 0, 128), (2048, 7, 64), (4096, 7, 128)]  # (B, hard negatives per anchor, D)
CPU_BIG_SHAPE = (65536, 0, 256)  # B = N = 65536: 16 GiB of fp32 logits


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
        a, p, n = embeddings(B, h, D, torch.float32, device)
        for name, fn in (("reference", infonce_reference), ("chunked", infonce_chunked)):
            row = dict(B=B, N=N, D=D, provider=name)
            need, available = eager_bytes(B, N), available_bytes(device)
            if name == "reference" and need > available:
                row["note"] = f"refused: needs ~{need / 2**30:.0f} GiB, {available / 2**30:.0f} GiB available"
            else:
                if (B, h, D) == CPU_BIG_SHAPE:
                    print(f"{name}: one forward + backward at B = N = {B}, D = {D} (a minute or more) ...", flush=True)
                runs = []

                def timed():
                    start = time.perf_counter()
                    loss_and_grads(fn, a, p, n)
                    runs.append(time.perf_counter() - start)

                row["peak MiB"] = peak_rss_bytes(timed) / 2**20
                for _ in range(repeats - 1 if (B, h, D) != CPU_BIG_SHAPE else 0):
                    timed()
                seconds = statistics.median(runs)
                row.update({"fwd+bwd ms": 1e3 * seconds, "TFLOP/s": 6 * B * N * D / seconds / 1e12})
                if name == "chunked" and (B, h, D) == CPU_BIG_SHAPE:
                    row["note"] = f"one run; the reference would need {need / 2**30:.0f} GiB"
            print(" ".join(f"{c}={fmt(row[c])}" for c in columns if c in row), flush=True)
            rows.append(row)
        del a, p, n
    print("\n" + markdown(rows, columns))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m bench.kernels",
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
        os.execve(sys.executable, [sys.executable, "-m", "bench.kernels", *args_again, *(["--dry-run"] * ("--dry-run" not in args_again))],
                  {**os.environ, "TRITON_INTERPRET": "1"})
    if args.gpu_report or torch.cuda.is_available():
        gpu_report(args.gpu_report, dry_run=args.dry_run)
    else:
        cpu_benchmark(CPU_SHAPES + ([CPU_BIG_SHAPE] if args.big else []), max(1, args.repeats))


if __name__ == "__main__":
    main()
