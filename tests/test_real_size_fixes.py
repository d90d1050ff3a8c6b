"""What broke, or cost too much, at real size (python -m bench.real_size, a 3B-shaped Qwen2.5-VL and
Qwen2.5-Omni thinker on a CPU), checked here at tiny size:

  * a bf16 checkpoint (every hub MLLM) was loaded in fp32 on a CPU even for a bf16 run: 15-19 GB
    for a 3B model instead of 7-9 GB; it now stays bf16 where the run computes in bf16
    (precision.load_dtype), the tiny model (stored in fp32) and --precision fp32 stay fp32;
  * Qwen2.5-Omni's processor padded every clip to its whole window (300 s) before the mel
    transform: 0.6 s of CPU per 2.5 s clip; build_inputs pads to the batch's longest clip, with the
    same features on every real frame;
  * the generative loss ran lm_head on a strided [B, K, D] bf16 slice, which matmul takes through
    expand + bmm: a copy of the 151,936 x 2048 weight per sequence, +5 GB at batch 8 (3B); it now
    runs on one [B * K, D] matrix, with the same numbers;
  * continual pretraining of a real backbone kept every activation of the whole --pretrain-batch:
    19.6 GB for one step of 8 image-caption sequences on the 3B VL model; it now checkpoints
    activations (recomputed in the backward pass), as contrastive learning does on CUDA;
  * the log line's rate had one decimal: 0.05 pairs/s (3B on a CPU) printed as 0.1.
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from PIL import Image

from lco_mini import backbone, lora, losses, loop, stages
from lco_mini.support import precision
from lco_mini.tiny import tasks

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402


@pytest.fixture(scope="module")
def bf16_omni_dir(omni_dir, tmp_path_factory):
    """The tiny omni model stored in bf16, as hub checkpoints are."""
    folder = tmp_path_factory.mktemp("bf16_omni")
    model, processor = backbone.load(omni_dir, device="cpu", dtype=torch.float32)
    model.to(torch.bfloat16).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def dtypes(model) -> set:
    return {p.dtype for p in model.parameters()}


def test_load_dtype_rule():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert precision.load_dtype(cpu, "bf16", torch.bfloat16) == torch.bfloat16
    assert precision.load_dtype(cpu, "bf16", "bfloat16") == torch.bfloat16  # config.json spelling
    assert precision.load_dtype(cpu, "bf16", torch.float32) == torch.float32  # the tiny model
    assert precision.load_dtype(cpu, "bf16", None) == torch.float32  # no dtype recorded
    assert precision.load_dtype(cpu, "fp32", torch.bfloat16) == torch.float32  # --precision fp32: exact
    assert precision.load_dtype(cuda, "fp32", torch.float32) == torch.bfloat16  # CUDA, as before


def test_a_bf16_checkpoint_stays_bf16_in_a_bf16_run_on_a_cpu(omni_dir, bf16_omni_dir):
    assert dtypes(backbone.load(bf16_omni_dir, device="cpu", precision_used="bf16")[0]) == {torch.bfloat16}
    assert dtypes(backbone.load(bf16_omni_dir, device="cpu", precision_used="fp32")[0]) == {torch.float32}
    assert dtypes(backbone.load(omni_dir, device="cpu", precision_used="bf16")[0]) == {torch.float32}
    # without precision_used: the default precision, fp32 in the tests (LCO_MINI_PRECISION, conftest.py)
    assert dtypes(backbone.load(bf16_omni_dir, device="cpu")[0]) == {torch.float32}
    assert dtypes(backbone.load(bf16_omni_dir, device="cpu", dtype=torch.bfloat16)[0]) == {torch.bfloat16}


def test_train_contrastive_loads_a_bf16_base_in_bf16_and_saves_merged_in_bf16(bf16_omni_dir, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"anchor": {"text": f"a red circle number {i}"},
                                         "positive": {"text": f"circle {i}, red"}}) + "\n" for i in range(4)))
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--model", str(bf16_omni_dir), "--stage",
                             "contrastive", "--data", str(pairs), "--no-hard-negatives", "--batch-size", "4",
                             "--steps", "1", "--lora-r", "2", "--precision", "bf16", "--no-eval", "--out", str(out)],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    with safe_open(out / "merged" / "model.safetensors", "pt") as f:
        stored = {f.get_slice(name).get_dtype() for name in f.keys()}
    assert stored == {"BF16"}  # the base was loaded in bf16 (an fp32 load would have saved F32)


def clips():
    rng = np.random.default_rng(0)
    return [rng.uniform(-0.4, 0.4, n).astype(np.float32) for n in (16000, 7001, 12345)]


def test_audio_is_padded_to_the_longest_clip_with_the_same_embeddings(omni_dir, monkeypatch):
    model, processor = backbone.load(omni_dir, device="cpu", dtype=torch.float32)
    items = [{"audio": a} for a in clips()] + [{"audio": clips()[1], "text": "a tone"}, {"text": "no audio"}]
    targets = ["one", "two", "three", "four", "five"]
    short = backbone.build_inputs(processor, items)
    short_labelled = backbone.build_inputs(processor, items, targets=targets)
    monkeypatch.setattr(backbone, "_audio_kwargs", lambda processor, clips: {})  # the processor's own padding
    whole = backbone.build_inputs(processor, items)
    whole_labelled = backbone.build_inputs(processor, items, targets=targets)
    window = processor.feature_extractor.nb_max_frames
    assert whole["input_features"].shape[-1] == window
    assert short["input_features"].shape[-1] == -(-(16000 + 400) // 160) < window  # longest clip + an FFT window
    for key in ("input_ids", "attention_mask"):
        assert torch.equal(short[key], whole[key])
    assert torch.equal(short_labelled["labels"], whole_labelled["labels"])
    frames = short["feature_attention_mask"].sum(1)
    assert torch.equal(frames, whole["feature_attention_mask"].sum(1))
    for row, n in enumerate(frames.tolist()):
        assert torch.equal(short["input_features"][row, :, :n], whole["input_features"][row, :, :n])
    with torch.no_grad():
        assert torch.equal(backbone.embed_batch(model, short), backbone.embed_batch(model, whole))


@pytest.mark.parametrize("rate, text", [(0.0523, "0.0523"), (5.212, "  5.21"), (58.34, "  58.3"),
                                        (1234.5, "1234.5"), (0.0, "     0")])
def test_rate_keeps_three_digits_below_ten(rate, text):
    assert loop.rate_text(rate) == text


def lora_gradients(model_dir, checkpointed: bool) -> dict:
    model, processor = backbone.load(model_dir, device="cpu", dtype=torch.float32)
    torch.manual_seed(0)
    lora.add_lora(model, r=4, lora_alpha=8, lora_dropout=0.0)
    with torch.no_grad():  # B != 0, so that A gets a gradient too
        for _, layer in lora.lora_layers(model):
            layer.lora_B.weight.normal_(0, 0.02)
    if checkpointed:
        stages.checkpoint_activations(model)
        assert sum(bool(getattr(m, "gradient_checkpointing", False)) for m in model.modules()) > 0
    model.train()
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (56, 56, 3), dtype=np.uint8))
    examples = [({"image": image}, "a red circle"), ({"text": "a blue square"}, "blue, square")]
    loss = losses.generative_loss(model, losses.generative_inputs(processor, examples), torch.device("cpu"))
    loss.backward()
    return {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family", ["qwen2_5_vl_dir", "omni_dir"])
def test_checkpointed_activations_give_the_lora_gradients_of_a_plain_backward(family, request):
    model_dir = request.getfixturevalue(family)
    plain, checkpointed = lora_gradients(model_dir, False), lora_gradients(model_dir, True)
    assert plain.keys() == checkpointed.keys() and len(plain) > 0
    for name, grad in plain.items():
        assert checkpointed[name] is not None and grad.abs().max() > 0, name
        assert torch.allclose(checkpointed[name], grad, rtol=1e-4, atol=1e-7), name


def test_continual_pretraining_of_a_real_backbone_checkpoints_activations(qwen2_5_vl_dir, tmp_path, monkeypatch):
    calls = []
    original = stages.checkpoint_activations
    monkeypatch.setattr(stages, "checkpoint_activations", lambda model: (calls.append(model), original(model)))
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"anchor": {"text": t}, "positive": {"text": t.upper()}}) + "\n"
                            for t in ("a red circle", "a blue square")))
    train.cli(["--model", str(qwen2_5_vl_dir), "--stage", "pretrain", "--pretrain-data", str(docs),
               "--pretrain-steps", "1", "--pretrain-batch", "2", "--lora-r", "2", "--out", str(tmp_path / "out")])
    assert len(calls) == 1 and (tmp_path / "out" / "base" / "config.json").is_file()


def test_lm_head_runs_on_one_matrix_with_the_numbers_of_the_batched_slice(omni_dir):
    model, processor = backbone.load(omni_dir, device="cpu", dtype=torch.bfloat16)  # bf16 hidden states
    cpu, examples = torch.device("cpu"), tasks.world_caption_examples(6, 3)
    shapes = []
    model.lm_head.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape)))
    loss = losses.generative_loss(model, losses.generative_inputs(processor, examples), cpu)
    loss.backward()
    grads = [p.grad.clone() for p in (model.lm_head.weight, model.get_input_embeddings().weight)]
    model.zero_grad(set_to_none=True)
    inputs = losses.generative_inputs(processor, examples)
    labels = inputs["labels"]  # the loss as it was: lm_head on the [B, K, D] slice
    answer = int((labels != -100).sum(dim=1).max())
    decoder_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    decoder_inputs["input_features"] = decoder_inputs["input_features"].to(torch.bfloat16)
    hidden = backbone.multimodal_decoder(model)(**decoder_inputs, use_cache=False).last_hidden_state
    logits = model.lm_head(hidden[:, -answer - 1:-1])
    reference = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels[:, -answer:].flatten(),
                                                  ignore_index=-100)
    reference.backward()
    assert len(shapes[0]) == 2 and shapes[1] == (len(labels), answer, hidden.shape[-1])
    assert torch.equal(loss, reference)
    for ours, theirs in zip(grads, (model.lm_head.weight.grad, model.get_input_embeddings().weight.grad)):
        assert torch.equal(ours, theirs)
