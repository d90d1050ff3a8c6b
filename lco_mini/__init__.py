"""lco_mini: a minimal, readable implementation of LCO-Emb (language-centric omnimodal embeddings).

The method (what the paper specifies), one idea per file; read these first:
  backbone        load an MLLM; the "Summarize the above ... in one word:" prompt in a chat turn,
                  left padding, last-token pooling
  embedder        the Python API: Embedder.encode, texts / files / images / audio / video in,
                  vectors out
  lora            hand-written LoRA, adapter files in peft's format
  infonce         the loss: one-way InfoNCE with hard negatives (reference, chunked, Triton)
  pooling         last-token / mean pooling + L2 norm (reference, Triton)
  triton_support  what the two kernels share: the backend choice, Triton's interpreter, dtype rules
  losses          what one training step computes: generative loss, embeddings, InfoNCE across
                  processes, GradCache
  stages          the two training stages, each one flat loop: generative pretraining, text-only
                  contrastive learning
  loop            the bookkeeping around a loop: AdamW, lr schedule, clip, log, checkpoint, resume
  analysis        the measures: Recall@k, anisotropy, mutual kNN, CKA, CKNNA, nulls, the GRSL fit

tiny/             the built-in default: a tiny Qwen2.5-Omni thinker and the world it learns from
  model           the tiny model, its BPE tokenizer and processor, saved like a hub model
  world           the synthetic world: items, captions, hard negatives, a held-out split
  render          how the world looks and sounds: pixels, frames, waveforms, glyphs
  tasks           the tiny model's training batches drawn from the world

experiments/      the paper's experiments on a trained run (analyze.py, train.py's evaluation)
  evaluation      held-out retrieval, per-attribute accuracy, the captioning probe, jsonl pairs
  geometry        what anisotropy / alignment measure: which items, embeddings at every layer
  ladder          the Generation-Representation Scaling Law on a ladder of bases
  continual       continual generative pretraining on an unfamiliar script before CL (SeaDoc)
  rerun           a run's own contrastive learning, rerun on another base
  plots           the figures

interop/          using a trained model elsewhere
  export          the files sentence-transformers and vLLM read (written into every saved model)
  mteb_model      an mteb encoder, and the world's held-out retrieval as an offline mteb task

support/          what keeps runs safe and inputs well-formed
  cli             one-line errors (exit 2), bounded numbers, Ctrl-C, the OpenMP setting; no torch
  runs            whether a run may start: options, model, data, output folder, --resume
  lock            one run per output folder
  sources         what a --model string names: a folder or a hub id; no torch
  checkpoint      crash-safe checkpoints: atomic writes, every RNG state
  precision       bf16 where the hardware has it, fp32 trained weights
  media           checking and decoding image, audio and video files safely
  data            the official jsonl format (+ audio/video), checked line by line
  distributed     torchrun / DDP and cross-device negatives

The kernels' benchmarks live outside the package, in bench/; the command lines are train.py,
embed.py and analyze.py at the top of the repository.

The Python API (imported lazily: `import lco_mini` loads no torch; lco_mini/embedder.py):
  model = lco_mini.load("out/merged")      an Embedder: a trained model, a hub id or any supported
                                           backbone (+ adapter="DIR")
  model.encode(["a text", "photo.png", "sound.wav", {"image": img, "text": "..."}])
                                           [N, D] numpy, L2-normalised (sentence-transformers' shape)
  model.embed_texts / embed_images / embed_audios / embed_videos (lists) -> torch tensors
"""

__all__ = ["Embedder", "load"]

_API = {"Embedder": "lco_mini.embedder", "load": "lco_mini.embedder"}


def __getattr__(name):
    """The public API, imported on first use (torch and transformers load only then)."""
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'lco_mini' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
