"""A run's own text-only contrastive learning, rerun on another base model.

analyze.py compares bases that differ in one thing only: the GRSL rungs (pretraining stopped at
different steps) and the continual-pretraining arms (with and without reading an unfamiliar
script first). Each base gets exactly the CL the train.py run gave its own base: the same options
(seed, pairs, steps, lr, LoRA), the same stage (stages.run_contrastive), and the same RNG state at
the start, so the same LoRA initialisation and batches. Whatever differs after CL comes from the base.

  cl_args(config, device, steps)   the contrastive options as the run used them (its run_config.json)
  trainer(run, cl, device, log)    base folder -> (the CL'd model, LoRA merged, its processor)
  embedder_after_cl(...)           that model as an Embedder, for retrieval
"""
from __future__ import annotations

import argparse
import contextlib
import shutil
import tempfile
from pathlib import Path

import torch

from lco_mini.support import checkpoint, precision, runs


def cl_args(config: dict, device_name: str | None, steps: int | None = None):
    """(the options for the CL, the torch device): the run's contrastive options from its
    run_config.json, `steps` CL steps if given (warm-up scaled as train.py does), this machine's
    precision (said when it differs from the run's: the last GRSL rung then is not the run's (b))."""
    missing = [key for key in runs.RUN_KEYS["contrastive"] if key not in config]
    if missing:
        raise ValueError(f"the run's {runs.RUN_CONFIG} lacks {', '.join(missing)}: rerun `python train.py`")
    cl = argparse.Namespace(**{key: config[key] for key in runs.RUN_KEYS["contrastive"]})
    if steps:
        cl.steps, cl.warmup = steps, min(100, max(1, steps // 10))
    cl.resume, cl.ckpt_every, cl.device = False, 50, device_name  # a fresh CL, its checkpoints in a scratch folder
    cl.log_every = 10 ** 9  # only the first and last step's lines, into the log
    device = torch.device(device_name or ("cuda" if torch.cuda.is_available() else "cpu"))
    cl.precision, why = precision.choose(precision.DEFAULT, device)
    if cl.precision != config.get("precision", cl.precision):
        print(f"precision {cl.precision} here ({why}); the run used {config['precision']}, so CL on its own "
              f"base will not reproduce its (b) exactly")
    return cl, device


def trainer(run: Path, cl, device, log: Path):
    """folder -> the run's text-only CL on it (stages.run_contrastive), LoRA merged; the CL's log
    lines are appended to `log`. Every call starts from the RNG state the run's CL started from (the
    pretraining checkpoint's), so every base gets the same LoRA initialisation."""
    from lco_mini import lora, stages  # lazy: model code, only once a CL runs

    state = checkpoint.saved_rng(Path(run) / "pretrain.ckpt.pt", cl.seed)  # read once, set for every base
    if state is None:
        print(f"no {Path(run) / 'pretrain.ckpt.pt'} of seed {cl.seed}: every CL starts from that seed instead")

    def contrastive(folder: Path):
        checkpoint.set_rng_state(state) if state is not None else torch.manual_seed(cl.seed)
        scratch = Path(tempfile.mkdtemp(prefix="lco_mini_cl_"))  # the CL's checkpoints, deleted after
        try:
            with open(log, "a") as out, contextlib.redirect_stdout(out):
                print(f"--- {folder}")
                model, processor = stages.run_contrastive(cl, device, folder, scratch, None)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return lora.merge_lora(model), processor
    return contrastive


def embedder_after_cl(contrastive, folder: Path, device, batch_size: int = 32, max_text_tokens: int | None = None):
    """`contrastive(folder)` (a trainer()), as an Embedder that cuts texts as the run did."""
    from lco_mini.embedder import Embedder  # lazy: it loads transformers' model code

    trained, processor = contrastive(folder)
    kwargs = {} if max_text_tokens is None else {"max_text_tokens": max_text_tokens}
    return Embedder(trained, processor, batch_size=batch_size, device=device, progress=False, **kwargs)
