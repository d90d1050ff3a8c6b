"""A trained lco_mini model in mteb (2.x), the paper's benchmark harness (MIEB is its image part).

    python -m lco_mini.interop.mteb_model out/merged                    # offline: the world's held-out
                                                                        # image/audio/video -> text retrieval
    python -m lco_mini.interop.mteb_model out/merged --benchmark "MIEB(lite)" --device cuda --out results
                                                                        # with the Hub: a real benchmark

  LcoMiniEncoder      mteb's encoder protocol around lco_mini.embedder.Embedder: mteb hands encode()
                      a DataLoader of dict batches ("text" strings, "image" PIL images, "audio"
                      {"array", "sampling_rate"} dicts, "video" frames); each row becomes one item,
                      embedded with the paper's fixed per-modality prompt (mteb's task prompts are not
                      used, as in mteb's own LCOEmbedding wrapper)
  model_meta          the ModelMeta of a model folder: size, dimension, modalities, cosine scoring
  world_task          a local retrieval task whose load_data builds the world's held-out queries, the
                      distinct captions and the relevance judgements itself: nothing is downloaded

On the world task mteb's recall@1 and @5 equal lco_mini's own evaluation (tests/test_interop.py).
They could differ only on an exact score tie: mteb (pytrec_eval) orders ties by document id, the
project's Recall@k counts a tie against the right caption.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

import mteb
from mteb.abstasks.retrieval import AbsTaskRetrieval
from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData
from mteb.abstasks.task_metadata import TaskMetadata
from mteb.models import ModelMeta
from mteb.models.abs_encoder import AbsEncoder
from mteb.models.modality_collators import AudioCollator, FramesCollator, VideoCollator
from mteb.models.model_meta import ScoringFunction

from lco_mini.support import cli

SAMPLING_RATE = 16_000  # what lco_mini's audio tower takes
ITEM_KEYS = ("text", "image", "video", "audio")  # a batch's content keys (others: "id", "title", ...)


class LcoMiniEncoder(AbsEncoder):
    """mteb's encoder protocol: encode(DataLoader of dict batches) -> [N, D] float32 unit vectors."""

    def __init__(self, model_path, device=None, batch_size: int = 16, fps: float = 2.0, max_frames: int = 16):
        from lco_mini.embedder import Embedder  # lazy: torch and transformers load here

        self.embedder = Embedder.from_pretrained(model_path, device=device, progress=False, batch_size=batch_size)
        self.fps, self.max_frames = fps, max_frames

    def _install_collator(self, inputs) -> None:
        """datasets' Audio / Video columns give decoders: mteb's collators turn them into 16 kHz arrays
        and sampled frames (plain columns reach _item as arrays and frames already)."""
        features = getattr(inputs.dataset, "features", None) or {}
        if type(features.get("video")).__name__ == "Video":
            inputs.collate_fn = VideoCollator(target_sampling_rate=SAMPLING_RATE, fps=self.fps,
                                              max_frames=self.max_frames, min_frames=2)
        elif type(features.get("audio")).__name__ == "Audio":
            inputs.collate_fn = AudioCollator(target_sampling_rate=SAMPLING_RATE)

    def _item(self, batch: dict, row: int) -> dict:
        item = {}
        for key in ITEM_KEYS:
            value = (batch.get(key) or [None] * (row + 1))[row]
            if value is None:
                continue
            if key == "audio" and not isinstance(value, np.ndarray):
                value = _audio_array(value)
            if key == "video":
                value = _frames(value, self.fps, self.max_frames)
            item[key] = value
        return item

    def encode(self, inputs, *, task_metadata, hf_split, hf_subset, prompt_type=None, **kwargs) -> np.ndarray:
        self._install_collator(inputs)
        rows = []
        for batch in inputs:
            size = len(next(iter(batch.values())))
            rows.append(self.embedder.embed([self._item(batch, i) for i in range(size)]).numpy())
        return np.concatenate(rows) if rows else np.zeros((0, self.embedder.dim), np.float32)


def _audio_array(value) -> np.ndarray:
    """{"array", "sampling_rate"} (or a decoder that reads like one) -> float32 at 16 kHz."""
    array, rate = np.asarray(value["array"], dtype=np.float32), int(value["sampling_rate"])
    if rate != SAMPLING_RATE:
        array = AudioCollator.resample_audio({"audio": {"array": array, "sampling_rate": rate}},
                                             target_sampling_rate=SAMPLING_RATE)
    return np.asarray(array, dtype=np.float32)


def _frames(value, fps: float, max_frames: int) -> list:
    if type(value).__name__ == "VideoDecoder":
        value = FramesCollator.resample_video(value, fps=fps, max_frames=max_frames, min_frames=2)
    if hasattr(value, "permute"):  # a uint8 tensor [T, C, H, W] -> H x W x 3 frames
        return [frame.permute(1, 2, 0).contiguous().numpy() for frame in value]
    return list(value)


def model_meta(model_path, name: str = "lco-mini/local") -> ModelMeta:
    """mteb's description of a model folder (name must be "org/name"); cosine scoring."""
    from lco_mini import backbone

    source, config = backbone.load_config(model_path)
    modalities = list(backbone.input_kinds(backbone.load_processor(source)))
    text = config.get_text_config()
    n_parameters = _parameters(Path(source)) if Path(source).is_dir() else None
    return ModelMeta(
        loader=LcoMiniEncoder, loader_kwargs={"model_path": str(model_path)}, name=name, revision="local",
        release_date=None, languages=["eng-Latn"], n_parameters=n_parameters,
        memory_usage_mb=round(n_parameters * 4 / 2**20, 1) if n_parameters else None,  # fp32 weights
        max_tokens=text.max_position_embeddings, embed_dim=text.hidden_size, license="not specified",
        open_weights=False, public_training_code=None, public_training_data=None,
        framework=["PyTorch", "Transformers"], reference=None, similarity_fn_name=ScoringFunction.COSINE,
        use_instructions=True,  # the fixed "Summarize the above ... in one word:" prompt per modality
        training_datasets=set(), modalities=modalities, model_type=["dense"])


def _parameters(folder: Path) -> int | None:
    from safetensors import safe_open

    total = 0
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as weights:
            total += sum(int(np.prod(weights.get_slice(key).get_shape())) for key in weights.keys())
    return total or None


def load(model_path, name: str = "lco-mini/local", device=None, batch_size: int = 16) -> LcoMiniEncoder:
    """The encoder with its ModelMeta. (ModelMeta.load_model would refuse a model that declares video
    when mteb's video extra, torchcodec, is not installed, although no video task may be run.)"""
    encoder = LcoMiniEncoder(model_path, device=device, batch_size=batch_size)
    encoder.mteb_model_meta = model_meta(model_path, name)
    return encoder


# ----------------------------------------------------------------------------- the world's held-out retrieval

CATEGORY = {"image": "i2t", "audio": "a2t", "video": "v2t"}


def world_task(modality: str, n: int = 300, seed: int = 1234) -> AbsTaskRetrieval:
    """X->text retrieval on the world's held-out items, exactly as evaluation.task_items draws them:
    `n` queries, one candidate per distinct caption (ids q00000.. and c00000.., never equal)."""
    metadata = TaskMetadata(
        name=f"LcoMiniWorld{modality.title()}2TextRetrieval", category=CATEGORY[modality],
        modalities=[modality, "text"], type="Any2AnyRetrieval", main_score="recall_at_1",
        description="lco_mini's synthetic world, held-out split: each item retrieves its caption among "
                    "the distinct captions of the queries (lco_mini.experiments.evaluation)",
        reference=None, dataset={"path": "local/lco-mini-world", "revision": "local"},  # built, never loaded
        eval_splits=["test"], eval_langs=["eng-Latn"], date=("2025-01-01", "2025-01-01"), domains=[],
        task_subtypes=[], license="not specified", annotations_creators="derived", dialect=[],
        sample_creation="created", bibtex_citation="")

    class WorldRetrieval(AbsTaskRetrieval):
        def load_data(self, num_proc=None, **kwargs) -> None:
            from datasets import Dataset

            from lco_mini.experiments.evaluation import task_items

            if self.data_loaded:
                return
            items, captions, targets = task_items(modality, n, seed)
            query_ids = [f"q{i:05d}" for i in range(len(items))]
            doc_ids = [f"c{j:05d}" for j in range(len(captions))]
            if modality == "audio":  # a plain column: datasets' Audio feature would need torchcodec to decode
                media = [{"array": item.media.astype(np.float32), "sampling_rate": SAMPLING_RATE} for item in items]
            else:  # PIL images (stored losslessly as PNG), or lists of PIL frames
                media = [item.media for item in items]
            self.dataset = {"default": {"test": RetrievalSplitData(
                queries=Dataset.from_dict({"id": query_ids, modality: media}),
                corpus=Dataset.from_dict({"id": doc_ids, "text": captions}),
                relevant_docs={q: {doc_ids[t]: 1} for q, t in zip(query_ids, targets.tolist())},
                top_ranked=None)}}
            self.data_loaded = True

    WorldRetrieval.metadata = metadata
    return WorldRetrieval()


def evaluate(encoder, tasks, out: Path, batch_size: int = 32):
    """mteb's own evaluation; its results cache goes to `out` (never a shared one)."""
    return mteb.evaluate(encoder, tasks=tasks, cache=mteb.ResultCache(cache_path=out), overwrite_strategy="always",
                         co2_tracker=False, show_progress_bar=False, encode_kwargs={"batch_size": batch_size})


def main(argv=None) -> None:
    p = cli.Parser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n", 1)[1],
                   formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a model folder train.py wrote (out/merged), or any supported backbone")
    p.add_argument("--benchmark", help='an mteb benchmark, e.g. "MIEB(lite)" (needs the Hub and mteb[image]); '
                                       "default: the world's held-out retrieval, offline")
    p.add_argument("--name", default="lco-mini/local", help="the model's name in mteb's results (org/name)")
    p.add_argument("--n", type=cli.number(low=2), default=300, help="world queries per modality (default: 300)")
    p.add_argument("--device", default=None, help="cpu, cuda ... (default: cuda if available)")
    p.add_argument("--batch-size", type=cli.number(low=1), default=32, help="inputs per forward pass")
    p.add_argument("--out", default="out/mteb", help="mteb's results folder (default: out/mteb)")
    args = p.parse_args(argv)
    encoder = load(args.model, args.name, args.device, args.batch_size)
    if args.benchmark:
        tasks = mteb.get_benchmark(args.benchmark)
    else:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        tasks = [world_task(m, args.n) for m in ("image", "audio", "video") if m in encoder.embedder.kinds]
    result = evaluate(encoder, tasks, Path(args.out), args.batch_size)
    for task_result in result.task_results:
        scores = task_result.scores["test"][0] if "test" in task_result.scores else {}
        extra = "  ".join(f"R@{k} {100 * scores[f'recall_at_{k}']:.1f}" for k in (1, 5) if f"recall_at_{k}" in scores)
        print(f"{task_result.task_name:<48} main score {task_result.get_score():.4f}  {extra}")
    print(f"results in {args.out}")


if __name__ == "__main__":
    main()
