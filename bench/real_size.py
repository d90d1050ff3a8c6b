"""Real size without a download: the README's real-backbone commands on a 3B-shaped model.

    python -m bench.real_size --family qwen2_5_vl --size 3b        # Qwen2.5-VL-3B-Instruct's shapes
    python -m bench.real_size --family qwen2_5_omni --size 3b      # the Qwen2.5-Omni-3B thinker's shapes
    python -m bench.real_size --family qwen2_5_vl --size tiny      # the same path on a tiny config (seconds)
    python -m bench.real_size --family qwen2_5_omni --size 3b --device cuda   # on a GPU: + peak GPU memory

A model built from the published config (bench/configs/, each value with its source) with random
weights has the real shapes and the real cost, so it proves the path at real size: memory, bf16 on
a frozen base, M-RoPE over real vision grids, the processors' real pixel budgets and audio window,
a 151,936-token embedding matrix, GradCache at a real micro-batch. Nothing is downloaded: the
tokenizer is a small byte-level BPE padded to the real vocabulary, so that the real special tokens
sit at their real ids (151643...), and the processor carries the published settings (patch 14,
merge 2, 3,136..12,845,056 pixels; for Omni, Whisper features of 128 mel bins at 16 kHz).

Steps, each a subprocess run as a user runs it (python train.py / embed.py / analyze.py):
  build        the model from the config, in bf16 on the CPU (reused from --work when present)
  contrastive  train.py --stage contrastive --data pairs.jsonl: text pairs plus a quarter of image
               (and, for Omni, audio) pairs, LoRA r 64 alpha 128, batch 8 under GradCache
               (--micro-batch 2), --precision auto, 2 steps
  pretrain     train.py --stage pretrain --pretrain-data docs.jsonl: continual pretraining, 1 step
  evaluate     python -m lco_mini.experiments.evaluation MERGED --data eval.jsonl (held-out pairs)
  embed        embed.py --model MERGED image.png [sound.wav] --text ...
  anisotropy   analyze.py anisotropy --model MERGED --data eval.jsonl
Each step's wall time, peak resident memory (the child's own high-water mark, from wait4) and,
for training, pairs (or sequences) per second go into a table, printed and written to
--work/results-FAMILY-SIZE.md; with --device cuda also the child's peak GPU memory.
The data (224 x 224 images: 64 merged vision tokens; 2.5 s tones at 16 kHz; short captions) is
generated here, in the official jsonl format.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.real_size_data import DOC_PROMPTS, scene_items, tone_items, write_data

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = Path(__file__).resolve().parent / "configs"
CONFIG_FILES = {"qwen2_5_vl": "qwen2_5_vl_3b.json", "qwen2_5_omni": "qwen2_5_omni_3b_thinker.json"}
# --size tiny: the same config with small towers (the vocabulary stays 151,936, the processor real)
TINY = {"text": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, mrope_section=[2, 3, 3]),
        "vision": dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, fullatt_block_indexes=[1]),
        "audio": dict(d_model=32, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64)}
LEARNED_VOCAB = 2000  # BPE merges learned on the captions; ids up to the first special token are fillers
SEED = 0
PEAK_ENV = "LCO_MINI_BENCH_CUDA_PEAK"  # the child prints its peak GPU memory at exit (bench/_cuda_peak.py)


# ----------------------------------------------------------------------------- the model

def read_config(family: str) -> dict:
    return json.loads((CONFIGS / CONFIG_FILES[family]).read_text())


def build_tokenizer(corpus: list[str], special: dict):
    """A byte-level BPE with Qwen2's pre-tokenizer, learned on `corpus`, padded with never-produced
    filler tokens up to the first special id, then the real special tokens at their real ids."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    from lco_mini.tiny.model import QWEN2_PRETOKENIZE_REGEX

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=LEARNED_VOCAB, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    state = json.loads(bpe.to_str())
    vocab = state["model"]["vocab"]
    for i in range(len(vocab), special["first_id"]):  # unreachable by any merge: never produced
        vocab[f"<|filler_{i}|>"] = i
    bpe = Tokenizer.from_str(json.dumps(state))
    bpe.add_special_tokens(special["tokens"])
    tokenizer = Qwen2TokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token=None, padding_side="left", extra_special_tokens=special["named"])
    first = tokenizer.convert_tokens_to_ids(special["tokens"][0])
    if first != special["first_id"] or len(tokenizer) != special["first_id"] + len(special["tokens"]):
        raise RuntimeError(f"special tokens at {first}, vocabulary {len(tokenizer)}: not the real layout")
    return tokenizer


def build_processor(family: str, config: dict, tokenizer):
    from transformers import (Qwen2_5_VLProcessor, Qwen2_5OmniProcessor, Qwen2VLImageProcessor,
                              Qwen2VLVideoProcessor, WhisperFeatureExtractor)

    from lco_mini.tiny.model import chat_template

    p = config["_processor"]
    grid = dict(patch_size=p["patch_size"], merge_size=p["merge_size"], temporal_patch_size=p["temporal_patch_size"])
    images = Qwen2VLImageProcessor(min_pixels=p["min_pixels"], max_pixels=p["max_pixels"],
                                   image_mean=p["image_mean"], image_std=p["image_std"], **grid)
    videos = Qwen2VLVideoProcessor(**grid)  # the library's defaults are the published video settings
    template = chat_template(config["_special_tokens"]["named"])
    if family == "qwen2_5_vl":
        return Qwen2_5_VLProcessor(image_processor=images, video_processor=videos, tokenizer=tokenizer,
                                   chat_template=template)
    audio = WhisperFeatureExtractor(feature_size=p["feature_size"], sampling_rate=p["sampling_rate"],
                                    hop_length=p["hop_length"], n_fft=p["n_fft"], chunk_length=p["chunk_length"],
                                    dither=p["dither"], padding_value=p["padding_value"],
                                    return_attention_mask=p["return_attention_mask"])
    return Qwen2_5OmniProcessor(image_processor=images, video_processor=videos, feature_extractor=audio,
                                tokenizer=tokenizer, chat_template=template)


def model_config(family: str, size: str, tokenizer):
    """The transformers config: the published values, the tiny sizes for --size tiny, and the one
    id that depends on the locally learned BPE (the Omni thinker's user_token_id, "user")."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5OmniThinkerConfig

    values = {k: v for k, v in read_config(family).items() if not k.startswith("_")}
    if family == "qwen2_5_vl":
        if size == "tiny":
            text = dict(TINY["text"])
            values["rope_scaling"] = {"type": "mrope", "mrope_section": text.pop("mrope_section")}
            values.update(text)
            values["vision_config"].update(TINY["vision"], out_hidden_size=values["hidden_size"])
        return Qwen2_5_VLConfig(**values)
    user = tokenizer.convert_tokens_to_ids("user")
    if user is None or user == tokenizer.unk_token_id or len(tokenizer.tokenize("user")) != 1:
        raise RuntimeError("'user' is not one token of the local tokenizer")
    values["user_token_id"] = user
    if size == "tiny":
        text = dict(TINY["text"])
        values["text_config"]["rope_scaling"]["mrope_section"] = text.pop("mrope_section")
        values["text_config"].update(text)
        hidden = values["text_config"]["hidden_size"]
        values["vision_config"].update(TINY["vision"], out_hidden_size=hidden)
        values["audio_config"].update(TINY["audio"], output_dim=hidden)
    return Qwen2_5OmniThinkerConfig(**values)


def corpus() -> list[str]:
    """What the BPE learns from: the captions, the chat template's words and the LCO prompts."""
    from lco_mini.backbone import PROMPTS

    texts = [c for item in scene_items(200) + tone_items(60) for c in (item["caption"], item["paraphrase"])]
    words = ["system\nYou are a helpful assistant.", "user\n", "assistant\n"] + \
        [p.replace("{text}", "") for p in PROMPTS.values()] + DOC_PROMPTS
    return texts + words * 50


def build_model(family: str, size: str, folder: Path) -> None:
    """Build, seed and save the model + processor into `folder` (written whole, then renamed).
    The weights are made in bf16 directly (_from_config with dtype): no fp32 copy is ever held."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2_5OmniThinkerForConditionalGeneration

    t0 = time.time()
    config_values = read_config(family)
    tokenizer = build_tokenizer(corpus(), config_values["_special_tokens"])
    processor = build_processor(family, config_values, tokenizer)
    config = model_config(family, size, tokenizer)
    model_class = {"qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
                   "qwen2_5_omni": Qwen2_5OmniThinkerForConditionalGeneration}[family]
    torch.manual_seed(SEED)
    model = model_class._from_config(config, dtype=torch.bfloat16).eval()
    text = config.get_text_config()
    model.generation_config.eos_token_id = [text.eos_token_id]
    model.generation_config.pad_token_id = text.pad_token_id
    n = sum(p.numel() for p in model.parameters())
    print(f"built {model_class.__name__}: {n / 1e9:.3f}B parameters in bf16 ({2 * n / 2**30:.1f} GiB), "
          f"hidden {text.hidden_size}, {text.num_hidden_layers} layers, vocab {text.vocab_size} "
          f"(tokenizer {len(tokenizer)}), {time.time() - t0:.0f} s", flush=True)
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    (tmp / "real_size.json").write_text(json.dumps(
        {"family": family, "size": size, "seed": SEED, "parameters": n,
         "config": str((CONFIGS / CONFIG_FILES[family]).relative_to(ROOT))}, indent=2) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    print(f"saved to {folder} in {time.time() - t0:.0f} s", flush=True)


# ----------------------------------------------------------------------------- running a step

def run_step(name: str, argv: list[str], log: Path, device: str) -> dict:
    """Run argv (a python command) in a subprocess from the repository root, print its output as it
    comes, and measure wall time, the child's peak RSS (wait4: this child only) and, on CUDA, its peak
    GPU memory. Returns the measurements and the output."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    if device == "cuda":  # bench/_cuda_peak.py runs the command and prints torch's peak at exit
        env[PEAK_ENV] = "1"
        argv = [argv[0], "-m", "bench._cuda_peak", *argv[1:]]
    print(f"\n=== {name}: {' '.join(_short(a) for a in argv)}", flush=True)
    t0 = time.time()
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1)
    lines = []
    with open(log, "w") as f:
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            f.write(line)
            print("  | " + line.rstrip("\n")[-200:], flush=True)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.time() - t0
    result = {"step": name, "seconds": seconds, "peak_rss_gib": usage.ru_maxrss / 2**20, "rc": proc.returncode,
              "output": lines}
    gpu = [l for l in lines if l.startswith("cuda peak memory:")]
    if gpu:
        result["peak_gpu_gib"] = float(gpu[-1].split()[3])
    print(f"=== {name}: {'ok' if proc.returncode == 0 else f'FAILED (exit {proc.returncode})'} in "
          f"{seconds:.0f} s, peak RSS {result['peak_rss_gib']:.2f} GiB", flush=True)
    return result


def _short(arg: str) -> str:
    return os.path.relpath(arg, ROOT) if arg.startswith("/") and len(arg) > 40 else arg


RATE_LINE = re.compile(r"^(\w+) step\s+(\d+) \| loss (\S+) \| lr \S+ \|\s+(\S+) (pairs|seqs)/s")
PHASE_LINE = re.compile(r"^(\w+): where a step's time went \(mean of (\d+) steps?\): (\d+) ms/step")


def training_rate(lines: list[str], items_per_step: int) -> str:
    """pairs/s (or seqs/s) of the log's last step line (train.py's rate since the start), and of
    one step after the first (its phase line: the first step's warm-up left out)."""
    rate = [m for m in map(RATE_LINE.match, lines) if m]
    phase = [m for m in map(PHASE_LINE.match, lines) if m]
    if not rate:
        return ""
    text = f"{float(rate[-1].group(4)):.3g} {rate[-1].group(5)}/s"
    if phase and int(phase[-1].group(2)) >= 1 and len(rate) > 1:
        text += f" ({items_per_step / (int(phase[-1].group(3)) / 1000):.3g} after step 1)"
    return text


def losses(lines: list[str]) -> str:
    return ", ".join(m.group(3) for m in map(RATE_LINE.match, lines) if m)


# ----------------------------------------------------------------------------- the command

def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        pass
    flags = " ".join(l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("flags")).split()
    flag = next((f for f in ("avx512_bf16", "amx_bf16") if f in flags), None)  # precision.CPU_BF16_FLAGS
    memory = next((int(l.split()[1]) / 2**20 for l in open("/proc/meminfo") if l.startswith("MemTotal")), 0)
    return (f"{model}, {os.cpu_count()} cores, {memory:.0f} GiB RAM, "
            f"{'native bf16 (' + flag.upper().replace('_', '-') + ')' if flag else 'no native bf16'}")


def table(results: list[dict], device: str) -> str:
    gpu = device == "cuda"
    head = "| step | wall s | peak RSS GiB |" + (" peak GPU GiB |" if gpu else "") + " rate | note |"
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        rows.append(f"| {r['step']} | {r['seconds']:.0f} | {r['peak_rss_gib']:.2f} |"
                    + (f" {r.get('peak_gpu_gib', float('nan')):.2f} |" if gpu else "")
                    + f" {r.get('rate', '')} | {r.get('note', '')} |")
    return "\n".join(rows)


def get_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=sorted(CONFIG_FILES), required=True)
    p.add_argument("--size", choices=["3b", "tiny"], default="3b",
                   help="3b: the published config; tiny: the same family and processor, tiny towers (default: 3b)")
    p.add_argument("--work", default="/work/scratch/real_size",
                   help="work folder: built models (reused), data, runs, logs, the table (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                   help="train.py --precision (default: auto = bf16 where native)")
    p.add_argument("--pretrain-batch", type=int, default=8, help="sequences in the continual pretraining step")
    p.add_argument("--rebuild", action="store_true", help="build the model again even if --work holds it")
    p.add_argument("--keep-runs", action="store_true",
                   help="keep the runs' model folders (merged/, base/: a model's size each); default: delete them")
    p.add_argument("--build-only", action="store_true", help="only build the model folder (the build step runs this)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = get_args(argv)
    work = Path(args.work).resolve()
    name = f"{args.family}-{args.size}"
    model_dir = work / "models" / name
    if args.build_only:
        return build_model(args.family, args.size, model_dir)
    runs, data_dir, logs = work / "runs" / name, work / "data" / args.family, work / "logs" / name
    for folder in (runs, data_dir, logs):
        folder.mkdir(parents=True, exist_ok=True)
    py, dev = sys.executable, ["--device", args.device]
    print(f"real-size check: {name} on {args.device} | {machine()} | work folder {work}", flush=True)
    t_start, results = time.time(), []

    def step(step_name: str, argv: list[str], **extra) -> dict:
        result = run_step(step_name, argv, logs / f"{step_name}.log", args.device)
        result.update(extra)
        results.append(result)
        if result["rc"] != 0:
            print(f"\n{step_name} failed: see {logs / (step_name + '.log')}", file=sys.stderr)
            report(args, work, name, results, t_start)
            sys.exit(1)
        return result

    if args.rebuild or not (model_dir / "real_size.json").is_file():
        step("build", [py, "-m", "bench.real_size", "--family", args.family, "--size", args.size,
                       "--work", str(work), "--build-only"], note="bf16 weights, seeded, saved with save_pretrained")
    else:
        print(f"\n=== build: reusing {model_dir} (--rebuild to build it again)", flush=True)
    files = write_data(data_dir, args.family)
    print(f"data: {', '.join(str(files[k].relative_to(work)) for k in ('pairs', 'docs', 'eval'))}", flush=True)

    cl, pt, merged = runs / "contrastive", runs / "pretrain", runs / "contrastive" / "merged"
    r = step("contrastive", [py, "train.py", "--model", str(model_dir), "--stage", "contrastive",
                             "--data", str(files["pairs"]), "--multimodal-ratio", "0.25", "--lora-r", "64",
                             "--lora-alpha", "128", "--batch-size", "8", "--micro-batch", "2", "--steps", "2",
                             "--precision", args.precision, "--no-eval", "--log-every", "1",
                             "--out", str(cl), "--overwrite", *dev])
    r["rate"], r["note"] = training_rate(r["output"], 8), f"2 steps x 8 pairs, losses {losses(r['output'])}; + save merged/"
    r = step("pretrain", [py, "train.py", "--model", str(model_dir), "--stage", "pretrain",
                          "--pretrain-data", str(files["docs"]), "--pretrain-steps", "1",
                          "--pretrain-batch", str(args.pretrain_batch), "--precision", args.precision,
                          "--log-every", "1", "--out", str(pt), "--overwrite", *dev])
    r["rate"] = training_rate(r["output"], args.pretrain_batch)
    r["note"] = f"1 step x {args.pretrain_batch} sequences, loss {losses(r['output'])}; + merge, save base/"
    if not args.keep_runs:
        shutil.rmtree(pt / "base", ignore_errors=True)
    step("evaluate", [py, "-m", "lco_mini.experiments.evaluation", str(merged), "--data", str(files["eval"]), *dev],
         note="held-out pairs of eval.jsonl on merged/")
    inputs = [str(files["image"])] + ([str(files["audio"])] if "audio" in files else [])
    texts = [files["image_text"]] + ([files["audio_text"]] if "audio" in files else [])
    step("embed", [py, "embed.py", "--model", str(merged), *inputs, *[a for t in texts for a in ("--text", t)], *dev],
         note=f"{len(inputs)} files + {len(texts)} texts")
    step("anisotropy", [py, "analyze.py", "anisotropy", "--model", str(merged), "--data", str(files["eval"]),
                        "--out", str(runs / "analysis"), *dev], note="every layer, eval.jsonl's anchors and positives")
    if not args.keep_runs:
        for folder in (merged, cl / "adapter"):
            shutil.rmtree(folder, ignore_errors=True)
    report(args, work, name, results, t_start)


def report(args, work: Path, name: str, results: list[dict], t_start: float) -> None:
    import torch
    import transformers

    lines = [f"real-size check `python -m bench.real_size --family {args.family} --size {args.size}"
             f"{' --device ' + args.device if args.device != 'cpu' else ''}`: {name}",
             f"machine: {machine()}; torch {torch.__version__}, transformers {transformers.__version__}, "
             f"{torch.get_num_threads()} threads",
             "", table(results, args.device), "",
             f"total {time.time() - t_start:.0f} s; peak RSS = the step's own process (wait4 ru_maxrss)"]
    precision = next((l for r in results for l in r["output"] if l.startswith("device: ")), None)
    if precision:
        lines.insert(2, f"train.py: {precision}")
    text = "\n".join(lines)
    path = work / f"results-{name}.md"
    path.write_text(text + "\n")
    print("\n" + text + f"\n\nwritten to {path}", flush=True)


if __name__ == "__main__":
    main()
