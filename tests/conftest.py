"""Shared fixtures: tiny *random* backbones of the three supported families, built locally
(no hub) and saved to folders, so tests go through backbone.load(folder) like real use.
Every test runs in fp32, train.py subprocesses included (lco_mini/support/precision.py)."""
import os
import subprocess
import sys
from pathlib import Path

os.environ["LCO_MINI_PRECISION"] = "fp32"  # before lco_mini.support.precision reads it
from lco_mini.support import cli as command_line  # noqa: E402 (imports no torch)

# How torch's idle OpenMP threads wait is read when torch loads (here, below): the setting the scripts
# make, so that a script run in this process (run_here) computes as fast as `python train.py`. With
# libgomp's default (long spinning), a tiny model's steps took up to 20x longer next to another busy job.
command_line.spin_briefly()
for _offline in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):  # nothing is downloaded: models and data are built here
    os.environ.setdefault(_offline, "1")

import pytest
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLProcessor,
)

from lco_mini.tiny import model as tiny

CORPUS = ["a red circle above a blue square", "the dog barks twice", "a green triangle moves left",
          "the word 42 is written in black ink", "two small yellow stars, one big star!"] * 20
SMALL = tiny.SIZES["smoke"]  # smaller than the default, so the tests stay fast on two CPU cores
VOCAB = 400  # enough BPE merges to make "user" a single token


@pytest.fixture(scope="session")
def omni_dir(tmp_path_factory):
    """Tiny Qwen2.5-Omni thinker + Qwen2_5OmniProcessor, via tiny.build_tiny."""
    return tiny.build_tiny(tmp_path_factory.mktemp("omni"), seed=0, corpus=CORPUS, vocab_size=VOCAB, **SMALL)


# The VL family (Qwen2-VL, Qwen2.5-VL) names its vision tokens differently and has no audio.
VL_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                     "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
VL_NAMED_TOKENS = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                   "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>"}


def _build_vl(out_dir, config_class, model_class, processor_class, vision: dict):
    import torch

    tokenizer = tiny.build_tokenizer(CORPUS, vocab_size=VOCAB, special_tokens=VL_SPECIAL_TOKENS,
                                     named_tokens=VL_NAMED_TOKENS)
    tid = tokenizer.convert_tokens_to_ids
    text = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
                bos_token_id=None, eos_token_id=tid("<|im_end|>"), pad_token_id=tid("<|endoftext|>"))
    config = config_class(text_config=text, vision_config=vision,
                          image_token_id=tid("<|image_pad|>"), video_token_id=tid("<|video_pad|>"),
                          vision_start_token_id=tid("<|vision_start|>"), vision_end_token_id=tid("<|vision_end|>"))
    torch.manual_seed(0)
    model_class(config).save_pretrained(out_dir)
    processor_class(image_processor=tiny.image_processor(), tokenizer=tokenizer,
                    video_processor=tiny.video_processor(), chat_template=tiny.chat_template(VL_NAMED_TOKENS)
                    ).save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def qwen2_vl_dir(tmp_path_factory):
    vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, patch_size=8, spatial_merge_size=2,
                  temporal_patch_size=2, mlp_ratio=4)
    return _build_vl(tmp_path_factory.mktemp("qwen2_vl"), Qwen2VLConfig, Qwen2VLForConditionalGeneration,
                     Qwen2VLProcessor, vision)


@pytest.fixture(scope="session")
def qwen2_5_vl_dir(tmp_path_factory):
    vision = dict(depth=2, hidden_size=32, intermediate_size=128, num_heads=2, out_hidden_size=64, patch_size=8,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=64, fullatt_block_indexes=[1])
    return _build_vl(tmp_path_factory.mktemp("qwen2_5_vl"), Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                     Qwen2_5_VLProcessor, vision)


# ----------------------------------------------------------------------------- a smoke run of train.py
ROOT = Path(__file__).resolve().parents[1]
SMOKE_RUN = ["--tiny-size", "smoke", "--pretrain-batch", "8", "--batch-size", "8", "--eval-n", "12", "--no-control"]


def train(args, **kwargs):
    """python train.py ARGS in a subprocess (as a user runs it): stdout, stderr, returncode."""
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, **kwargs)


# ----------------------------------------------------------------------------- a script run in this process
# A new interpreter spends seconds importing torch + transformers before a script does anything, so
# most tests run a script's main(argv) here instead, as `python SCRIPT ARGV` would run it: the same
# exit code (SystemExit's; an uncaught exception is 1, with its traceback on stderr, as Python prints
# it), stdout and stderr (print, Python warnings and log records included), the repository as the
# working directory, and a fresh process's logging settings. Nothing it changes leaks into the tests
# after it: the random states, os.environ, tempfile's folder, transformers' verbosity and progress bars
# are put back. The tests about the process itself (SIGKILL, OpenMP before torch loads, torchrun, a
# non-UTF-8 stdout) still start one.

ENTRY_POINTS = {"train.py": "cli", "analyze.py": "main", "embed.py": "main"}  # what `if __name__ == "__main__"` calls


class Ran(subprocess.CompletedProcess):
    """What a finished run left: returncode, stdout, stderr (text), as subprocess.run gives them."""


def run_here(script: str, args, env: dict | None = None) -> Ran:
    """`python SCRIPT ARGS` (SCRIPT: train.py, analyze.py or embed.py), run in this process by calling
    what the script's `__main__` block calls (train.py: cli, which turns a user mistake into one line
    and exit 2; the others: main). env: variables set for this run only (for what reads them while it
    runs, as tempfile reads TMPDIR; not for what was read at import, as LCO_MINI_PRECISION)."""
    import contextlib
    import importlib
    import io
    import logging
    import random
    import tempfile
    import traceback
    import warnings

    import numpy as np
    import torch
    import transformers

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    entry = getattr(importlib.import_module(Path(script).stem), ENTRY_POINTS[script])
    argv = [str(a) for a in args]
    # a process's stdout and stderr: UTF-8 text streams over bytes (embed.main reconfigures stdout)
    out_bytes, err_bytes = io.BytesIO(), io.BytesIO()
    stdout = io.TextIOWrapper(out_bytes, encoding="utf-8", write_through=True)
    stderr = io.TextIOWrapper(err_bytes, encoding="utf-8", errors="backslashreplace", write_through=True)
    saved = dict(env=dict(os.environ), argv=sys.argv, tempdir=tempfile.tempdir, torch_rng=torch.get_rng_state(),
                 random=random.getstate(), numpy=np.random.get_state(),
                 verbosity=transformers.utils.logging.get_verbosity(),
                 bars=transformers.utils.logging.is_progress_bar_enabled())
    log_to_stderr = logging.StreamHandler(stderr)
    log_to_stderr.setLevel(logging.WARNING)  # what Python's last-resort handler prints
    loggers = [logging.getLogger(), transformers.utils.logging.get_logger()]
    code = 0
    try:
        os.environ.update(env or {})
        tempfile.tempdir = None  # read TMPDIR again
        sys.argv = [str(ROOT / script), *argv]
        transformers.utils.logging.set_verbosity(transformers.utils.logging._get_default_logging_level())
        transformers.utils.logging.enable_progress_bar()
        for logger in loggers:
            logger.addHandler(log_to_stderr)
        with contextlib.chdir(ROOT), contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr), \
                warnings.catch_warnings():
            warnings.resetwarnings()  # Python's own filters, not pytest's; printed to (this) stderr
            for action, category in [("ignore", DeprecationWarning), ("ignore", PendingDeprecationWarning),
                                     ("ignore", ImportWarning), ("ignore", ResourceWarning)]:
                warnings.simplefilter(action, category)
            warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: \
                stderr.write(warnings.formatwarning(message, category, filename, lineno, line))
            try:
                entry(argv)
            except SystemExit as stop:
                if stop.code is None or isinstance(stop.code, int):
                    code = stop.code or 0
                else:  # sys.exit("message"): the message on stderr, exit code 1
                    print(stop.code, file=sys.stderr)
                    code = 1
            except Exception:  # noqa: BLE001 - what an uncaught exception does to a process
                traceback.print_exc()
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
    finally:
        for logger in loggers:
            logger.removeHandler(log_to_stderr)
        os.environ.clear()
        os.environ.update(saved["env"])
        sys.argv, tempfile.tempdir = saved["argv"], saved["tempdir"]
        torch.set_rng_state(saved["torch_rng"])
        random.setstate(saved["random"])
        np.random.set_state(saved["numpy"])
        transformers.utils.logging.set_verbosity(saved["verbosity"])
        (transformers.utils.logging.enable_progress_bar if saved["bars"]
         else transformers.utils.logging.disable_progress_bar)()
    return Ran([script, *argv], code, out_bytes.getvalue().decode("utf-8"), err_bytes.getvalue().decode("utf-8"))


def train_here(args, env: dict | None = None) -> Ran:
    """python train.py ARGS, run in this process (run_here)."""
    return run_here("train.py", args, env)


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """A smoke run of 8 pretraining steps: snapshots at 1, 2, 4, 6 (auto), base/ at 8, merged/ after 3
    CL steps (the GRSL ladder and the continual experiment's base)."""
    out = tmp_path_factory.mktemp("ladder")
    result = train_here([*SMOKE_RUN, "--out", str(out), "--pretrain-steps", "8", "--steps", "3"])
    assert result.returncode == 0, result.stderr[-3000:]
    return out
