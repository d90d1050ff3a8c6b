"""The GPU report of the InfoNCE and pooling kernels: correctness and benchmarks in one go.

    python -m bench.kernels --gpu-report OUTDIR             CUDA -> OUTDIR/<gpu>.md/.csv
    python -m bench.kernels --gpu-report OUTDIR --dry-run   the same code on CPU: tiny shapes, interpreter

Made to run in about 3 to 4 minutes on an H200: every section has a deadline, every provider a time
budget, and every cell its own try block, so a slow or broken provider costs one row, never the
report. Files are rewritten after each section. Correctness compares fp32/bf16/fp16 with the fp32
reference; benchmarks put eager, torch.compile, chunked, Triton, inf_cl and liger_kernel side by side.
The measuring tools (clock, memory, tables) are bench/measure.py, shared with the CPU benchmark
(bench/kernels.py, which also holds the command line).
"""
import csv
import gc
import os
import platform
import re
import subprocess
import time
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from lco_mini.infonce import infonce_candidates, infonce_chunked, infonce_reference, infonce_triton, triton_configs
from bench.measure import (Clock, available_bytes, eager_bytes, embeddings, errors, fmt, loss_and_grads,
                              markdown)
from lco_mini.pooling import TritonPool, pool_reference
from lco_mini.triton_support import triton, triton_interprets

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
    infonce_until_s: float  # seconds after the report's start when no new InfoNCE benchmark cell starts
    pool_until_s: float  # the same for pooling (which runs first: it is cheap and bounded)
    provider_budget_s: float = 45.0
    compile_budget_s: float = 60.0
    forced_chunk_rows: int = 128  # correctness: also run the Triton backward with chunks this small (several + a tail)


_GPU_PLAN = _Plan(
    check_dtypes=(torch.float32, torch.bfloat16, torch.float16), bench_dtype=torch.bfloat16,
    check_infonce=[(37, 3, 53), (300, 7, 1100), (1024, 3, 256)], check_pool=[(5, 67, 300), (64, 512, 1024)],
    infonce=[(1024, 0, 1024), (1024, 7, 1024), (4096, 7, 2560), (4096, 7, 4096), (16384, 0, 1024), (65536, 0, 1024)],
    pool_sizes=((8, 64, 256), (512, 2048, 8192), (1024, 4096)), infonce_until_s=200, pool_until_s=110)
_DRY_PLAN = _Plan(  # the interpreter has no bf16 tl.dot: fp32 only
    check_dtypes=(torch.float32,), bench_dtype=torch.float32,
    check_infonce=[(37, 3, 53)], check_pool=[(5, 13, 21)], infonce=[(37, 0, 53), (24, 2, 40)],
    pool_sizes=((3,), (7, 33), (40,)), infonce_until_s=600, pool_until_s=600, forced_chunk_rows=16)
_TOLERANCE = {  # (loss abs, grad max-abs error / max-abs value), against the fp32 reference on the same inputs
    torch.float32: (1e-4, 2e-4), torch.float16: (1e-3, 5e-3), torch.bfloat16: (1e-3, 2e-2), torch.float64: (1e-6, 1e-6)}
_POOL_TOLERANCE = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2, torch.float64: 1e-10}  # max rel error



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
        limit *= 2 if provider == TRITON_PROVIDER else 1  # it also times every config (_fastest_triton_config)
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
    logits = (a @ infonce_candidates(p, n).T).float() / temperature
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
        return cal_inf_loss(a / temperature, infonce_candidates(p, n), head_dim=head_dim)
    return run


def _liger_provider():
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    loss_fn = LigerFusedLinearCrossEntropyLoss()

    def run(a, p, n, temperature=0.03):  # InfoNCE as a "linear layer + CE": input a / tau, weight = candidates
        out = loss_fn(infonce_candidates(p, n), a / temperature, torch.arange(len(a), device=a.device))
        return out[0] if isinstance(out, tuple) else out
    return run


TRITON_PROVIDER = "triton (chunked-G bwd)"


def _fastest_triton_config(a, p, n, clock):
    """The config of triton_configs() with the fastest forward + backward at this shape, and every timing as a
    note, so that the report shows one Triton row per shape and still records how the others did."""
    timings = {}
    for config in triton_configs(a.device, a.dtype):
        try:
            timings[config] = clock.ms(lambda: loss_and_grads(lambda a, p, n: infonce_triton(a, p, n, config=config), a, p, n))
        except Exception as e:  # e.g. a config that does not fit this GPU's shared memory
            timings[config] = f"{type(e).__name__}"
    measured = [c for c, t in timings.items() if isinstance(t, float)]
    best = min(measured, key=timings.get) if measured else next(iter(timings))
    note = "configs: " + ", ".join(f"{c} {fmt(t)}" + (" ms" if isinstance(t, float) else "") for c, t in timings.items())
    return best, (note if len(timings) > 1 else "")


def _infonce_providers(device, dtype, dry_run):
    """(name, fn or None, why not) for every implementation the report compares."""
    providers = [("eager reference (fp32 logits)", infonce_reference, None)]
    if dtype != torch.float32:
        providers.append(("eager (16-bit matmul)", _eager_16bit, None))
    providers.append(("torch.compile(reference)", _compiled_infonce, "skipped in the dry run" if dry_run else None))
    providers.append(("chunked (PyTorch)", infonce_chunked, None))
    providers.append((TRITON_PROVIDER, None, None))  # its config is tuned per shape (_fastest_triton_config)
    for name, make in (("inf_cl", _inf_cl_provider), ("liger_kernel FLCE", _liger_provider)):
        fn = make() if device.type == "cuda" else None
        providers.append((name, fn, None if fn else ("not installed" if device.type == "cuda" else "CUDA only")))
    return providers


def _truth(a, p, n, device):
    """Loss and fp32 gradients of the fp32 reference on fp32 copies; the chunked path when that won't fit."""
    copies = [None if t is None else t.detach().float().requires_grad_() for t in (a, p, n)]
    N = len(p) + (0 if n is None else len(n))
    if eager_bytes(len(a), N) < min(EAGER_LIMIT_BYTES, 0.9 * available_bytes(device)):
        try:
            return loss_and_grads(infonce_reference, *copies), "reference"
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
    return loss_and_grads(infonce_chunked, *copies), "chunked (reference OOM)"


def _infonce_correctness(device, plan):
    rows = []
    for B, h, D in plan.check_infonce:
        for dtype in plan.check_dtypes:
            a, p, n = embeddings(B, h, D, dtype, device, seed=B + D)
            truth, _ = _truth(a, p, n, device)
            loss_tol, grad_tol = _TOLERANCE[dtype]
            configs = triton_configs(device, dtype)
            if dtype != plan.bench_dtype or (B, h, D) != plan.check_infonce[-1]:
                configs = configs[:1]  # every config the benchmark times is checked once, at the last shape
            if plan.forced_chunk_rows < B:  # the backward in several chunks of G, the last one short
                configs = configs + [replace(configs[0], chunk_rows=plan.forced_chunk_rows)]
            checks = [("chunked", infonce_chunked)] + [
                (f"triton {c}", lambda a, p, n, c=c: infonce_triton(a, p, n, config=c)) for c in configs]
            for name, fn in checks:
                row = dict(B=B, N=B * (1 + h), D=D, dtype=str(dtype).replace("torch.", ""), path=name)
                try:
                    first, second = loss_and_grads(fn, a, p, n), loss_and_grads(fn, a, p, n)
                    loss_err, grad_err = errors(first, truth)
                    same = bool(torch.equal(first[0], second[0]) and all(torch.equal(x, y) for x, y in zip(first[1], second[1])))
                    ok = loss_err <= loss_tol and grad_err <= grad_tol and (same or not name.startswith("triton"))
                    row.update({"loss abs err": loss_err, "grad rel err": grad_err, "tolerance": f"{loss_tol:g} / {grad_tol:g}",
                                "bitwise repeatable": "yes" if same else "no", "result": "PASS" if ok else "FAIL"})
                except Exception as e:  # report, never crash: this runs once with a hard time limit
                    row.update({"result": "FAIL", "note": f"{type(e).__name__}: {str(e)[:120]}"})
                rows.append(row)
                print("  ".join(f"{k}={fmt(v)}" for k, v in row.items()), flush=True)
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
            print("  ".join(f"{k}={fmt(v)}" for k, v in row.items()), flush=True)
    return rows


def _infonce_benchmark(device, plan, budget, dry_run):
    clock, dtype, rows = Clock(device, repeats=2), plan.bench_dtype, []
    providers = _infonce_providers(device, dtype, dry_run)
    for B, h, D in plan.infonce:
        N = B * (1 + h)
        if budget.elapsed() > plan.infonce_until_s:
            rows.append(dict(B=B, h=h, N=N, D=D, note="skipped: report time budget"))
            continue
        a, p, n = embeddings(B, h, D, dtype, device)
        truth, truth_name = _truth(a, p, n, device)
        candidates = infonce_candidates(p, n).detach()
        with torch.no_grad():
            matmul_ms = clock.ms(lambda: a.detach() @ candidates.T)  # the same-shape product, in the input dtype
        for name, fn, why_not in providers:
            row = dict(B=B, h=h, N=N, D=D, provider=name)
            eager = name.startswith(("eager", "torch.compile"))
            why_not = why_not or budget.skip_reason(name, plan.infonce_until_s) or (
                eager and eager_bytes(B, N) > EAGER_LIMIT_BYTES and "skipped: est. memory > 100 GB")
            if why_not:
                row["note"] = why_not
            else:
                start = time.perf_counter()
                try:
                    if name == TRITON_PROVIDER:
                        config, row["note"] = _fastest_triton_config(a, p, n, clock)
                        row["provider"] = f"{name} {config}"
                        fn = lambda a, p, n, config=config: infonce_triton(a, p, n, config=config)  # noqa: E731
                    result = []
                    extra = clock.peak_bytes(lambda: result.append(loss_and_grads(fn, a, p, n)))
                    loss_err, grad_err = errors(result[0], truth)
                    del result
                    with torch.no_grad():
                        fwd_ms = clock.ms(lambda: fn(a, p, n))
                    full_ms = clock.ms(lambda: loss_and_grads(fn, a, p, n))
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
            print("  ".join(f"{k}={fmt(v)}" for k, v in row.items()), flush=True)
        rows.append(dict(B=B, h=h, N=N, D=D, provider=f"matmul {str(dtype).replace('torch.', '')} (B x D @ D x N)", **{"fwd ms": matmul_ms}))
        del a, p, n, truth, candidates
    return rows


def _copy_gbs(device, clock, nbytes):
    """Bandwidth of a plain device copy (read + write), the yardstick for the pooling kernels."""
    source = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    target = torch.empty_like(source)
    return 2 * nbytes / clock.ms(lambda: target.copy_(source)) / 1e6


def _pool_benchmark(device, plan, budget):
    clock, dtype, rows = Clock(device, repeats=2, rep_ms=30), plan.bench_dtype, []
    nbytes = 2**30 if device.type == "cuda" else 2**24
    copy_gbs = _copy_gbs(device, clock, nbytes)
    rows.append(dict(mode="copy", **{"fwd GB/s": copy_gbs, "note": f"copy_ of {nbytes >> 20} MiB (read + write): the yardstick"}))
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
                                fwd_gbs, bwd_gbs = fwd_bytes / fwd_ms / 1e6, bwd_bytes / bwd_ms / 1e6
                                row.update({"fwd GB/s": fwd_gbs, "bwd GB/s": bwd_gbs,
                                            "fwd % copy": 100 * fwd_gbs / copy_gbs, "bwd % copy": 100 * bwd_gbs / copy_gbs})
                            del out
                    except torch.cuda.OutOfMemoryError:
                        row["note"] = "OOM"
                    except Exception as e:
                        row["note"] = f"error: {type(e).__name__}: {str(e)[:100]}"
                    rows.append(row)
                    print("  ".join(f"{k}={fmt(v)}" for k, v in row.items()), flush=True)
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
        lines += [f"## {title}", "", *notes, "", markdown(rows, columns), ""]
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines))
    columns = ["section"] + list(env)
    for _, section_columns, rows, _ in sections:  # each section's columns, in order, the first time they appear
        columns += dict.fromkeys(c for c in section_columns + [k for r in rows for k in r] if c not in columns)
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
                           "triton is imported (`python -m bench.kernels --gpu-report DIR --dry-run` does it)")
    device, plan = torch.device("cuda" if on_gpu else "cpu"), (_GPU_PLAN if on_gpu else _DRY_PLAN)
    env, sections, budget = _environment(device, not on_gpu), [], _Budget(plan)
    print(", ".join(f"{k}: {v}" for k, v in env.items()), flush=True)

    def section(title, columns, rows, notes=()):
        sections.append((title, columns, rows, list(notes)))
        print(f"\n## {title}\n" + "\n".join(notes) + "\n" + markdown(rows, columns) + "\n", flush=True)
        if outdir:
            _write_report(outdir, env, sections)

    check = ["B", "N", "D", "dtype", "path", "loss abs err", "grad rel err", "tolerance", "bitwise repeatable", "result", "note"]
    section("Correctness: InfoNCE vs the fp32 reference (same inputs)", check, _infonce_correctness(device, plan),
            ["grad rel err = max over anchor/positive/negative of max|g - g_ref| / max|g_ref|; each path ran twice."])
    section("Correctness: pooling vs the fp32 reference", ["B", "T", "D", "dtype", "mode", "padding", "normalize",
            "out rel err", "grad rel err", "tolerance", "result", "note"], _pool_correctness(device, plan))
    section(f"Pooling benchmark ({str(plan.bench_dtype).replace('torch.', '')}, normalize=True, random left/right padding)",
            ["B", "T", "D", "mode", "triton fwd us", "triton bwd us", "fwd GB/s", "bwd GB/s", "fwd % copy", "bwd % copy",
             "torch fwd us", "torch bwd us", "note"],
            _pool_benchmark(device, plan, budget),
            ["GB/s counts what must move: forward reads the attended rows ('last': one per sequence) and the mask and "
             "writes [B, D]; backward writes the whole [B, T, D] gradient. Triton timed through TritonPool.apply "
             "(no input checks)."])
    bench = ["B", "h", "N", "D", "provider", "fwd ms", "fwd+bwd ms", "extra peak MiB", "TFLOP/s", "x (3 matmul)",
             "loss err", "grad err", "vs", "note"]
    section(f"InfoNCE benchmark ({str(plan.bench_dtype).replace('torch.', '')}, N = B (1 + h), tau = 0.03)", bench,
            _infonce_benchmark(device, plan, budget, not on_gpu),
            ["Median times (" + ("triton.testing.do_bench" if on_gpu else "CPU wall clock") + "); TFLOP/s counts 6 B N D "
             "useful FLOPs per forward + backward; 'x (3 matmul)' = fwd+bwd time / (3 x the same-shape matmul); "
             "extra peak = peak memory above the inputs" + (" (CUDA allocator)." if on_gpu else " (process RSS).")])
    print(f"report took {budget.elapsed():.0f} s" + (f"; written to {_write_report(outdir, env, sections)}.md/.csv" if outdir else ""))
    return sections
