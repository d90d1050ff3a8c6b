"""Embed files and text with an LCO-Emb model: one vector per input, all in one space.

    python embed.py cat.png                              # one file, the default model (out/merged)
    python embed.py cat.png bark.wav clip.gif frames/    # image, audio, video (gif / a folder of frames)
    python embed.py --text "a red circle" --text "a high tone"
    python embed.py *.png --out emb.npy                  # save an [N, D] float32 array (files, then texts)
    python embed.py *.png --text "a cat" --out emb.jsonl # one {"input", "modality", "vector"} per line
    python embed.py a.png b.wav --text "a red circle" --text "a high tone"   # zero-shot matching
    python embed.py --model Qwen/Qwen2.5-Omni-3B --adapter omni_run/adapter --device cuda photo.jpg
                                                         # a base model + the adapter train.py trained on it

Files and texts land in one space because of how the model was trained: the
contrastive stage saw only text, yet images, audio and video follow (the
LCO-Emb finding). So a file's best-matching text is a zero-shot label: give
candidate texts with --text next to the files and the script prints the
cosine similarity of every file to every text, and the best text per file.

Every input is checked *before* the model is loaded (that it exists, is a regular
file of a known kind, and has a readable header): a typo in the tenth file name
fails in a second, with one line naming it, not after a minute of loading. Files
are then decoded batch by batch, so memory does not grow with their number.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from lco_mini.support import media, sources
from lco_mini.support.cli import Parser, fail

DEFAULT_MODEL = "out/merged"  # the folder `python train.py` writes
PREVIEW_VALUES = 4  # how many leading values to print per vector
OUT_FORMATS = (".npy", ".jsonl")


def get_args(argv=None) -> argparse.Namespace:
    p = Parser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n", 1)[1],
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="*", metavar="FILE",
                   help="images, audio (.wav .flac .ogg), videos (animated .gif/.webp, .mp4 with PyAV, a folder of frames)")
    p.add_argument("--text", action="append", default=[], help="a text to embed (repeatable); with files: match files to texts")
    p.add_argument("--out", default=None, help="save the vectors: .npy ([N, D] float32) or .jsonl (default: print them)")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"hub id or folder: a merged model, or a base model with --adapter (default: {DEFAULT_MODEL})")
    p.add_argument("--adapter", default=None, help="folder with a LoRA adapter (adapter_config.json) to apply to --model")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--batch-size", type=int, default=16, help="inputs per forward pass (default: 16)")
    return p.parse_args(argv)


def check_inputs(paths: list[str], texts: list[str]) -> list[tuple[str, str, str]]:
    """(label, modality, path or text) per input, files then texts, each file checked from its
    header (nothing is decoded yet); any bad input -> fail()."""
    decoded = []
    for path in paths:
        try:
            decoded.append((path, media.probe(path), path))
        except media.MediaError as e:  # its message already names the file
            fail(str(e))
    for i, text in enumerate(texts, 1):
        if not text.strip():
            fail(f"--text #{i} ({text!r}): empty text")
        decoded.append((text.strip(), "text", text.strip()))
    if not decoded:
        fail("no inputs: give files or folders to embed, and/or --text \"...\" (see --help)")
    return decoded


def check_model(model: str, adapter: str | None) -> None:
    """Missing model / adapter folders are user mistakes too: say so before importing torch."""
    if model == DEFAULT_MODEL and not Path(model).exists():
        fail(f"no model at {DEFAULT_MODEL}: run `python train.py` first (a few minutes on a CPU), or pass --model")
    try:
        sources.model_source(model)
    except OSError as e:
        fail(f"{e} (--model takes a model folder or a hub id such as Qwen/Qwen2.5-Omni-3B)")
    if adapter is not None:
        check_adapter(model, adapter)


def check_adapter(model: str, adapter: str) -> None:
    """An adapter folder that can be read, and that belongs to --model (not already merged into it)."""
    folder = Path(adapter).expanduser()
    try:
        config = json.loads((folder / "adapter_config.json").read_text())
    except FileNotFoundError:
        fail(f"{adapter}: not an adapter folder (no adapter_config.json)")
    except (OSError, ValueError) as e:  # unreadable, not UTF-8, not JSON
        fail(f"{folder / 'adapter_config.json'}: not a readable adapter config ({' '.join(str(e).split())})")
    if not isinstance(config, dict) or not {"r", "target_modules"} <= set(config):
        fail(f"{folder / 'adapter_config.json'}: not a LoRA adapter config (no 'r' / 'target_modules')")
    if not (folder / "adapter_model.safetensors").is_file():
        fail(f"{adapter}: the adapter's weights are missing ({folder / 'adapter_model.safetensors'})")
    base = config.get("base_model_name_or_path")
    if base and Path(base).expanduser().is_dir() and Path(base).resolve() != Path(model).expanduser().resolve():
        # train.py writes adapter/ next to merged/, which already holds it: applying it would add it twice
        fail(f"{adapter} was trained on {base}, not on {model}; a merged model already contains its adapter: "
             f"pass --model {base} --adapter {adapter}, or --model {model} alone")
    if base and str(base) != model and not Path(base).expanduser().is_dir():
        print(f"note: {adapter} was trained on {base}; applying it to {model}")


def check_out(out: str | None) -> None:
    """--out must be a new or replaceable file in a folder we may write, before any work is done."""
    if out is None:
        return
    path = Path(out).expanduser()
    if path.suffix.lower() not in OUT_FORMATS:
        fail(f"{out}: --out must end in {' or '.join(OUT_FORMATS)}")
    if path.is_dir():
        fail(f"{out}: is a folder; --out takes a file name")
    folder = path.parent
    if not folder.is_dir():
        fail(f"{out}: folder {folder} does not exist")
    try:  # try it: permission bits say nothing for root, or on a read-only file system
        if path.exists():
            open(path, "ab").close()  # appends nothing: the old file is unchanged until save()
        else:
            open(path, "xb").close()
            path.unlink()
    except OSError as e:
        fail(f"{out}: cannot write there ({e.strerror or e})")


def check_device(device: str | None) -> None:
    from lco_mini.support.runs import device_problem  # imports torch: only once the inputs are known good

    problem = device_problem(device)
    if problem:
        fail(f"--device {problem}")


def check_model_takes(embedder, decoded, model: str) -> None:
    """An input of a modality the backbone has no tower for (audio for a VL model) is a user mistake."""
    from lco_mini import backbone

    takes = backbone.input_kinds(embedder.processor)
    for label, modality, _ in decoded:
        if modality not in takes:
            fail(f"{label}: {model} takes no {modality} (its {type(embedder.processor).__name__} takes "
                 f"{', '.join(takes)})")


def note_cut_audio(embedder, decoded) -> None:
    """Audio past the model's window is cut by its processor: say how much is used."""
    from lco_mini import backbone

    window = backbone.audio_window(embedder.processor)
    for label, modality, path in decoded:
        seconds = media.audio_seconds(path) if modality == "audio" else 0
        if window and seconds > window:
            print(f"note: {label}: {seconds:.1f} s of audio; the model uses the first {window:.0f} s")


def embed_all(embedder, decoded) -> np.ndarray:
    """[N, D] float32 in input order; the files are decoded batch by batch, inside the embedder."""
    try:
        return embedder.embed([{modality: value} for _, modality, value in decoded]).numpy().astype(np.float32)
    except media.MediaError as e:  # a file whose header was fine but whose data is not
        fail(str(e))


def save(out: str, decoded, vectors: np.ndarray) -> None:
    """Write to exactly the path given (np.save(name) would append .npy to 'X.NPY'), through a
    temporary file beside it and a rename: a full disk leaves an earlier file whole, never empty."""
    tmp = Path(out).with_name(Path(out).name + ".partial")
    try:
        if out.lower().endswith(".npy"):
            with open(tmp, "wb") as f:
                np.save(f, vectors)
        else:
            with open(tmp, "w") as f:
                for (label, modality, _), vector in zip(decoded, vectors):
                    f.write(json.dumps({"input": label, "modality": modality, "vector": vector.tolist()}) + "\n")
        os.replace(tmp, out)
    except OSError as e:  # a full disk, say; the checks before the model cover the usual mistakes
        tmp.unlink(missing_ok=True)
        fail(f"{out}: cannot write it ({e.strerror or e}); an earlier {out} is left as it was")
    print(f"saved {len(vectors)} vectors of dim {vectors.shape[1]} to {out}")


def print_vectors(decoded, vectors: np.ndarray) -> None:
    width = max(len(label) for label, _, _ in decoded)
    for (label, modality, _), vector in zip(decoded, vectors):
        head = ", ".join(f"{v:.4f}" for v in vector[:PREVIEW_VALUES])
        more = ", ..." if len(vector) > PREVIEW_VALUES else ""
        print(f"{modality:<5}  {label:<{width}}  dim {len(vector)}  [{head}{more}]")


def print_similarities(decoded, vectors: np.ndarray) -> None:
    """Cosine similarity files x texts (rows are unit vectors: a dot product) and the best text per file."""
    files = [i for i, (_, m, _) in enumerate(decoded) if m != "text"]
    texts = [i for i, (_, m, _) in enumerate(decoded) if m == "text"]
    similarity = vectors[files] @ vectors[texts].T
    width = max(len(decoded[i][0]) for i in files)
    print(f"\ncosine similarity, files x texts (T1..T{len(texts)} listed below):")
    print(" " * width + "".join(f"  {'T' + str(j + 1):>7}" for j in range(len(texts))) + "  best text")
    for row, i in zip(similarity, files):
        best = int(row.argmax())
        cells = "".join(f"  {s:7.4f}" for s in row)
        print(f"{decoded[i][0]:<{width}}{cells}  T{best + 1} {decoded[texts[best]][0]!r}")
    for j, i in enumerate(texts):
        print(f"  T{j + 1} = {decoded[i][0]!r}")


def main(argv=None) -> None:
    # a file name that is not UTF-8 reaches us as surrogates; print it escaped, not as a traceback
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")
    args = get_args(argv)
    if args.batch_size < 1:
        fail(f"--batch-size must be at least 1, got {args.batch_size}")
    check_out(args.out)
    decoded = check_inputs(args.inputs, args.text)
    check_model(args.model, args.adapter)

    from lco_mini.embedder import Embedder  # imports torch + transformers: only once the inputs are known good
    import transformers

    check_device(args.device)
    from lco_mini import backbone
    try:
        backbone.load_config(args.model)  # a text-only LLM or an unreachable hub: one line, before loading
    except (OSError, ValueError) as e:
        fail(" ".join(str(e).split())[:300])
    transformers.utils.logging.disable_progress_bar()  # a tiny model loads in a blink; keep the output clean

    try:
        embedder = Embedder.from_pretrained(args.model, adapter=args.adapter, device=args.device,
                                            batch_size=args.batch_size)
    except OSError as e:  # a hub id that cannot be found or fetched: transformers raises OSError
        fail(f"{args.model}: cannot load the model ({' '.join(str(e).split())[:300]})")
    except ValueError as e:  # an adapter that does not fit the model (lora.load_adapter names it)
        if args.adapter is None:
            raise
        fail(f"--adapter {args.adapter}: {' '.join(str(e).split())[:300]}")
    check_model_takes(embedder, decoded, args.model)
    note_cut_audio(embedder, decoded)
    vectors = embed_all(embedder, decoded)
    if embedder.truncated:
        print(f"note: {embedder.truncated} texts longer than {embedder.max_text_tokens} tokens were cut to it")

    if args.out:
        save(args.out, decoded, vectors)
    else:
        print_vectors(decoded, vectors)
    if args.text and len(args.text) < len(decoded):  # files and texts: zero-shot matching
        print_similarities(decoded, vectors)


if __name__ == "__main__":
    main()
