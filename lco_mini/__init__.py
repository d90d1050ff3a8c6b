"""lco_mini: a minimal, readable implementation of LCO-Emb (language-centric omnimodal embeddings).

Modules (one idea per file):
  lora           hand-written LoRA with peft-compatible adapter files
  triton_support what the kernels share: the backend choice, Triton's interpreter, dtype rules
  infonce        the InfoNCE loss: reference, chunked PyTorch, fused Triton
  pooling        last-token / mean pooling + L2 norm: reference and Triton
  measure        measuring tools for the benchmarks: clock, peak memory, tables
  gpu_report     the GPU report: correctness and benchmarks of both on CUDA
  kernels_bench  the CPU benchmark and the command line of both benchmarks
  media          decoding images, audio and video files
  tiny           the embedded tiny Qwen2.5-Omni-thinker-shaped default model
  backbone       loading an MLLM and turning prompted inputs into embeddings
  world          the synthetic omnimodal world the tiny model learns from
  render         how that world looks and sounds: pixels, frames, waveforms
  tasks          the tiny model's training batches drawn from the world
  data           the any2any jsonl dataset, and batches drawn from it epoch by epoch
  checkpoint     crash-safe checkpoints (atomic writes, RNG state)
  loop           the bookkeeping around train.py's loops: AdamW, lr schedule, clip, log, checkpoint, resume
  runs           whether a run may start: options, model, data, output folder, --resume
  sources        what a --model string names: a folder or a hub id
  distributed    torchrun / DDP and cross-device negatives
  analysis       retrieval metrics
  evaluation     held-out retrieval on the synthetic world
"""
