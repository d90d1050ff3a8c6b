"""Run a python command as `python -m bench._cuda_peak script.py ARGS` (or `-m module ARGS`) and print
torch's peak CUDA memory when it exits: how bench/real_size.py reads each step's peak GPU memory
without touching the scripts it measures."""
import atexit
import runpy
import sys


def _report() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        print(f"cuda peak memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB allocated "
              f"({torch.cuda.max_memory_reserved() / 2**30:.2f} GiB reserved)", flush=True)


def main() -> None:
    atexit.register(_report)
    args = sys.argv[1:]
    if args[:1] == ["-m"]:
        sys.argv = args[1:]
        runpy.run_module(args[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = args
        runpy.run_path(args[0], run_name="__main__")


if __name__ == "__main__":
    main()
