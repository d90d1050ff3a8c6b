"""What the three command lines (train.py, embed.py, analyze.py) share, imported before torch.

  fail(message)        a user mistake: one line on stderr starting "error:", exit code 2
  Parser               an ArgumentParser whose errors are such a line (not usage + error)
  number(...)          an argparse type for a bounded int or finite float
  spin_briefly()       how torch's idle OpenMP threads wait; must run before torch is imported
  interrupted(...)     Ctrl-C: one line saying what was kept and how to go on, exit code 130

Nothing here imports torch, so a script can check its options and inputs in a blink, before
loading anything heavy.
"""
from __future__ import annotations

import argparse
import math
import operator
import os
import shlex
import sys
from pathlib import Path


def fail(message: str):
    """A user mistake: one line on stderr, exit code 2, no traceback."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


class Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage + error; keep it to one line like every other mistake
        fail(f"{message} (see --help)")


def number(kind=int, low=None, above=None, high=None, below=None):
    """An argparse type: an int or finite float within the given bounds (a bad value exits 2 naming
    the option, before any work: --steps 0 or --lr -1 would train nothing, or fail after a step)."""
    bounds = [(b, sign, test) for b, sign, test in [(low, ">=", operator.ge), (above, ">", operator.gt),
                                                    (high, "<=", operator.le), (below, "<", operator.lt)] if b is not None]

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        for bound, sign, test in bounds:
            if not (math.isfinite(value) and test(value, bound)):
                raise argparse.ArgumentTypeError(f"must be {sign} {bound}, got {text}")
        return value
    return parse


def spin_briefly() -> None:
    """Let an idle OpenMP thread spin for a few microseconds (3,000 turns) before it sleeps.

    Most ops of the tiny model are small, so torch's second thread goes idle and is woken
    thousands of times a step. Waking a sleeping thread costs about a quarter of a pretraining
    step; spinning for long (libgomp's default, 300,000 turns) makes two jobs that share a
    2-core CPU steal each other's cores. libgomp reads the setting once, when torch loads it:
    call this before importing torch. A wait policy or spin count the user set wins (with
    OMP_WAIT_POLICY=PASSIVE and a spin count set too, libgomp would spin anyway). Running
    several jobs at once, set OMP_WAIT_POLICY=PASSIVE. docs/experiments.md has the measurements.
    """
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", "3000")


def interrupted(script: str, argv, out, resumable: bool = True):
    """Ctrl-C: instead of a KeyboardInterrupt traceback, one line on stderr naming the newest
    checkpoint in `out` and the command that continues from it; exit code 130 (128 + SIGINT)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    checkpoints = sorted(Path(out).glob("*.ckpt.pt"), key=lambda p: p.stat().st_mtime) if resumable else []
    if checkpoints:
        again = [a for a in argv if a not in ("--overwrite", "--resume")] + ["--resume"]
        print(f"interrupted: the last checkpoint is {checkpoints[-1]}; continue with: "
              f"python {script} {shlex.join(again)}", file=sys.stderr)
    else:
        print(f"interrupted: no checkpoint was written yet; run `python {script} {shlex.join(argv)}` again",
              file=sys.stderr)
    sys.exit(130)
