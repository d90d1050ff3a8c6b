"""The Python API: a trained model (or any supported backbone) as an embedding model.

    import lco_mini
    model = lco_mini.load("out/merged")                    # or a hub id, + adapter="out/adapter"
    vectors = model.encode(["a red circle", "cat.png", "bark.wav", "clip.gif"])   # [4, D] numpy
    vectors @ vectors.T                                    # unit vectors: cosine similarity

`encode` follows sentence-transformers' `SentenceTransformer.encode`: a list in, an [N, D]
array out (a single input gives one [D] vector), `batch_size`, a progress bar,
`normalize_embeddings`, numpy or torch output. It takes every kind of input at once:

  str               a text; or, when it names an existing file (or a folder of frames), that
                    file: an image, an audio file or a video (lco_mini/support/media.py)
  PIL.Image         an image
  1-D numpy array   audio at 16 kHz
  list of PIL       a video, as its frames (inside the list of inputs: [[frame, frame, ...]])
  dict              an item: any of "text", "image", "audio", "video" (values as above, files
                    as paths), e.g. {"image": "chart.png", "text": "What is the trend?"}

Each item goes through backbone.py: its modality's "Summarize the above ... in one word:"
prompt in a chat turn, left padding, the last token's final hidden state, L2-normalised.
The per-modality calls (embed_texts, embed_images, ...) and embed(items) return torch tensors.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from lco_mini import backbone
from lco_mini.backbone import MEDIA, bound_items, build_inputs, embed_batch, input_kinds
from lco_mini.support import media

ITEM_KEYS = ("text", *MEDIA)
MEDIA_SUFFIXES = media.IMAGE_EXTENSIONS + media.AUDIO_EXTENSIONS + media.VIDEO_EXTENSIONS


def load(name_or_path, adapter=None, device=None, dtype=None, **kwargs) -> "Embedder":
    """The embedding model in a folder train.py wrote (out/merged), a hub id or any supported backbone,
    optionally with a LoRA adapter folder (out/adapter on its base). device: cuda if available;
    dtype: bf16 on CUDA; on a CPU fp32, or bf16 for a bf16 checkpoint where bf16 is native
    (backbone.load). kwargs: batch_size, progress, max_text_tokens (Embedder)."""
    return Embedder.from_pretrained(name_or_path, adapter=adapter, device=device, dtype=dtype, **kwargs)


def _length_key(item: dict):
    """Sort key that groups items of one kind and similar length, so batches pad little."""
    return tuple(item.get(k) is not None for k in MEDIA), len(item.get("text") or "")


def as_item(value, position: int | None = None) -> dict:
    """One input of `encode` as an item dict (see the module docstring); a clear TypeError or
    ValueError naming the input for anything else."""
    where = "input" if position is None else f"input {position}"
    if isinstance(value, dict):
        unknown = set(value) - set(ITEM_KEYS)
        if unknown or not any(value.get(k) is not None for k in ITEM_KEYS):
            raise ValueError(f"{where}: a dict item takes any of {', '.join(ITEM_KEYS)}; got keys {sorted(value)}")
        return dict(value)
    if isinstance(value, str):
        return _str_item(value, where)
    if isinstance(value, Path):
        return _str_item(str(value), where)
    if hasattr(value, "getpixel"):  # a PIL image
        return {"image": value}
    if isinstance(value, np.ndarray) and value.ndim == 1:
        return {"audio": value}
    if isinstance(value, (list, tuple)) and value and all(hasattr(frame, "getpixel") for frame in value):
        return {"video": list(value)}
    raise TypeError(f"{where}: expected a text, a file path, a PIL image, a 1-D audio array, a list of "
                    f"video frames or a dict item; got {type(value).__name__}")


def _str_item(text: str, where: str) -> dict:
    """A string is a file when it names one; a string that looks like a file name but names
    nothing is an error (a typo would otherwise be embedded as a text)."""
    looks_like_file = "\n" not in text and len(text) < 4096 and Path(text).suffix.lower() in MEDIA_SUFFIXES
    if looks_like_file or (len(text) < 4096 and "\n" not in text and Path(text).is_dir()):
        path = Path(text).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"{where}: {text}: no such file (to embed it as a text, pass {{'text': ...}})")
        modality = media.modality_of(path)  # image, audio or video (a folder of frames is a video)
        return {modality: str(path)}
    if not text.strip():
        raise ValueError(f"{where}: an empty text")
    return {"text": text}


class Embedder:
    """Inference: items in, L2-normalised float32 CPU embeddings out ([N, D] or [L + 1, N, D]).

    Items are sorted by kind and length before batching (less padding) and returned in input
    order; batching cannot change an embedding (left padding, see backbone.py)."""

    def __init__(self, model, processor, batch_size: int = 16, device=None, progress: bool = True,
                 max_text_tokens: int | None = media.MAX_TEXT_TOKENS):
        self.model = model if device is None else model.to(device)
        self.processor, self.batch_size, self.progress = processor, batch_size, progress
        self.max_text_tokens = max_text_tokens
        self.truncated = 0  # texts cut to max_text_tokens so far, for a caller to report
        processor.tokenizer.padding_side = "left"

    @classmethod
    def from_pretrained(cls, name_or_path, adapter=None, device=None, dtype=None, **kwargs) -> "Embedder":
        """Load a backbone (see backbone.load), optionally with a LoRA adapter folder saved by lco_mini.lora."""
        model, processor = backbone.load(name_or_path, device=device, dtype=dtype)
        if adapter is not None:
            from lco_mini.lora import load_adapter  # lazy: only adapters need it
            load_adapter(model, adapter)
            model.to(next(model.parameters()).device)  # new LoRA weights follow the base weights
        return cls(model, processor, **kwargs)

    @property
    def kinds(self) -> tuple[str, ...]:
        """The inputs this backbone takes (see backbone.input_kinds)."""
        return input_kinds(self.processor)

    @property
    def dim(self) -> int:
        return self.model.config.get_text_config().hidden_size

    def encode(self, inputs, batch_size: int | None = None, show_progress_bar: bool | None = None,
               normalize_embeddings: bool = True, convert_to_numpy: bool = True, convert_to_tensor: bool = False):
        """Embeddings of texts, files, images, audio, videos and dict items, in input order (see the
        module docstring), as sentence-transformers' encode: a list gives [N, D], one input [D].
        normalize_embeddings=False returns the last token's hidden state before the L2 norm."""
        single = not isinstance(inputs, (list, tuple))  # one input, one [D] vector (a video: {"video": frames})
        items = [as_item(inputs)] if single else [as_item(value, i) for i, value in enumerate(inputs)]
        saved = self.batch_size, self.progress
        self.batch_size = batch_size or self.batch_size
        self.progress = self.progress if show_progress_bar is None else show_progress_bar
        try:
            vectors = self.embed(items, normalize=normalize_embeddings)
        finally:
            self.batch_size, self.progress = saved
        vectors = vectors[0] if single else vectors
        return vectors if convert_to_tensor or not convert_to_numpy else vectors.numpy()

    def embed(self, items: list[dict], layers: str = "last", normalize: bool = True) -> torch.Tensor:
        """Embeddings of `items` (dicts as for backbone.build_inputs), in input order."""
        if layers not in ("last", "all"):
            raise ValueError(f"layers must be 'last' or 'all', got {layers!r}")
        if not items:
            n_layers = self.model.config.get_text_config().num_hidden_layers
            return torch.zeros((0, self.dim) if layers == "last" else (n_layers + 1, 0, self.dim))
        order = sorted(range(len(items)), key=lambda i: _length_key(items[i]))
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        rows = [None] * len(items)
        was_training = self.model.training
        self.model.eval()  # no dropout at inference
        try:
            with torch.inference_mode():
                for batch in tqdm(batches, desc="embedding", unit="batch",
                                  disable=not self.progress or len(batches) < 2):
                    chunk, cut = bound_items(self.processor, [items[i] for i in batch], self.max_text_tokens)
                    self.truncated += cut
                    inputs = build_inputs(self.processor, chunk, max_text_tokens=None)  # cut already
                    embeddings = embed_batch(self.model, inputs, layers, normalize).float().cpu()
                    for j, i in enumerate(batch):
                        rows[i] = embeddings[..., j, :]
        finally:
            self.model.train(was_training)
        return torch.stack(rows, dim=-2)

    def embed_texts(self, texts: list[str], layers: str = "last") -> torch.Tensor:
        return self.embed([{"text": t} for t in _checked_list(texts, "texts", str)], layers)

    def embed_images(self, images: list, layers: str = "last") -> torch.Tensor:
        return self.embed([{"image": x} for x in _checked_list(images, "images")], layers)

    def embed_audios(self, audios: list, layers: str = "last") -> torch.Tensor:
        return self.embed([{"audio": x} for x in _checked_list(audios, "audios")], layers)

    def embed_videos(self, videos: list, layers: str = "last") -> torch.Tensor:
        return self.embed([{"video": x} for x in _checked_list(videos, "videos")], layers)

    def embed_interleaved(self, pairs: list[tuple], layers: str = "last") -> torch.Tensor:
        """(image, text) pairs: the image, then the text, then the instruction, in one turn."""
        return self.embed([{"image": image, "text": text} for image, text in _checked_list(pairs, "pairs")], layers)


def _checked_list(values, name: str, kind: type | None = None) -> list:
    """The per-modality calls take a list: a bare string (or path) would be embedded character by
    character, so it is a TypeError naming the argument."""
    if isinstance(values, (str, bytes, Path)) or not isinstance(values, (list, tuple)):
        raise TypeError(f"{name} must be a list, got {type(values).__name__} (wrap one input in a list: [x])")
    if kind is not None:
        for i, value in enumerate(values):
            if not isinstance(value, kind):
                raise TypeError(f"{name}[{i}] must be a {kind.__name__}, got {type(value).__name__}")
    return list(values)
