"""backbone.py on tiny random Qwen2-VL, Qwen2.5-VL and Qwen2.5-Omni-thinker checkpoints.

The central property is invariance: an item's embedding must not depend on the
batch it is in (left padding + position ids from the attention mask)."""
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    Qwen2_5OmniConfig,
    Qwen2_5OmniForConditionalGeneration,
    Qwen2_5OmniProcessor,
    Qwen2_5OmniThinkerForConditionalGeneration,
)

from lco_mini import backbone, lora
from lco_mini.support import sources
from lco_mini.backbone import PROMPTS, build_inputs, embed_batch
from lco_mini.embedder import Embedder

ATOL = 1e-5
TEXTS = ["a dog", "the red circle above the blue square moves slowly to the left, then stops", "two stars!"]


def _image(width, height, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


IMAGES = [_image(64, 64, 0), _image(128, 32, 1), _image(48, 32, 2)]  # 16, 16 and 6 image tokens
AUDIOS = [np.random.default_rng(3).uniform(-0.3, 0.3, n).astype(np.float32) for n in (16000, 8000, 24000)]
VIDEOS = [[_image(64, 64, 10 + i) for i in range(4)], [_image(32, 32, 20 + i) for i in range(8)]]


@pytest.fixture(scope="module", params=["qwen2_vl_dir", "qwen2_5_vl_dir", "omni_dir"])
def loaded(request):
    """(model, processor, is_omni) loaded from a saved folder."""
    model, processor = backbone.load(request.getfixturevalue(request.param), device="cpu")
    return model, processor, isinstance(processor, Qwen2_5OmniProcessor)


def _alone_vs_batched(model, processor, items):
    """Each item embedded alone, the list in one batch, and the reversed list (re-reversed)."""
    with torch.no_grad():
        alone = torch.cat([embed_batch(model, build_inputs(processor, [item])) for item in items])
        batch = build_inputs(processor, items)
        together = embed_batch(model, batch)
        backwards = embed_batch(model, build_inputs(processor, items[::-1])).flip(0)
    assert (batch["attention_mask"] == 0).any(), "the batch should need padding"
    return alone, together, backwards


def test_shapes_unit_norm_finite(loaded):
    model, processor, is_omni = loaded
    embedder = Embedder(model, processor, progress=False)
    d = model.config.get_text_config().hidden_size
    outputs = [embedder.embed_texts(TEXTS), embedder.embed_images(IMAGES)]
    if is_omni:
        outputs += [embedder.embed_audios(AUDIOS), embedder.embed_videos(VIDEOS)]
    for out, n in zip(outputs, [3, 3, 3, 2]):
        assert out.shape == (n, d) and out.dtype == torch.float32 and out.device.type == "cpu"
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out.norm(dim=-1), torch.ones(n), atol=1e-5, rtol=0)
    assert embedder.embed_texts([]).shape == (0, d)


def test_text_batch_invariance(loaded):
    model, processor, _ = loaded
    alone, together, backwards = _alone_vs_batched(model, processor, [{"text": t} for t in TEXTS])
    torch.testing.assert_close(together, alone, atol=ATOL, rtol=0)
    torch.testing.assert_close(backwards, alone, atol=ATOL, rtol=0)
    assert (alone[0] - alone[1]).abs().max() > 1e-3  # different texts, different embeddings


def test_image_batch_invariance(loaded):
    """Images of different sizes (different token counts) mixed with a text and an interleaved item."""
    model, processor, _ = loaded
    items = [{"image": IMAGES[0]}, {"text": TEXTS[1]}, {"image": IMAGES[1]},
             {"image": IMAGES[2], "text": "two stars"}]
    alone, together, backwards = _alone_vs_batched(model, processor, items)
    torch.testing.assert_close(together, alone, atol=ATOL, rtol=0)
    torch.testing.assert_close(backwards, alone, atol=ATOL, rtol=0)


def test_audio_video_batch_invariance(omni_dir):
    model, processor = backbone.load(omni_dir, device="cpu")
    items = [{"audio": AUDIOS[0]}, {"video": VIDEOS[0]}, {"text": TEXTS[0]}, {"audio": AUDIOS[2]},
             {"video": VIDEOS[1]}, {"image": IMAGES[0]}]
    alone, together, backwards = _alone_vs_batched(model, processor, items)
    torch.testing.assert_close(together, alone, atol=ATOL, rtol=0)
    torch.testing.assert_close(backwards, alone, atol=ATOL, rtol=0)


def test_embedder_order_and_batch_size_do_not_matter(loaded):
    model, processor, _ = loaded
    items = [{"text": TEXTS[1]}, {"image": IMAGES[2]}, {"text": TEXTS[0]}, {"image": IMAGES[0], "text": "a dog"},
             {"text": TEXTS[2]}]
    one_batch = Embedder(model, processor, batch_size=16, progress=False).embed(items)
    small_batches = Embedder(model, processor, batch_size=2, progress=False).embed(items)
    torch.testing.assert_close(small_batches, one_batch, atol=ATOL, rtol=0)
    with torch.no_grad():  # results come back in input order
        first = embed_batch(model, build_inputs(processor, items[:1]))
    torch.testing.assert_close(one_batch[:1], first, atol=ATOL, rtol=0)


def test_layers_all(loaded):
    model, processor, _ = loaded
    embedder = Embedder(model, processor, progress=False)
    n_layers = model.config.get_text_config().num_hidden_layers
    every = embedder.embed_texts(TEXTS, layers="all")
    assert every.shape == (n_layers + 1, 3, model.config.get_text_config().hidden_size)
    torch.testing.assert_close(every.norm(dim=-1), torch.ones(n_layers + 1, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(every[-1], embedder.embed_texts(TEXTS), atol=ATOL, rtol=0)  # last = "last"
    assert embedder.embed_images(IMAGES[:2], layers="all").shape[:2] == (n_layers + 1, 2)
    with pytest.raises(ValueError, match="layers"):
        embedder.embed_texts(TEXTS, layers="middle")


def test_interleaved(loaded):
    model, processor, _ = loaded
    embedder = Embedder(model, processor, progress=False)
    pairs = embedder.embed_interleaved([(IMAGES[0], "a dog"), (IMAGES[0], "two stars"), (IMAGES[1], "a dog")])
    image_only = embedder.embed_images(IMAGES[:1])
    assert pairs.shape == (3, model.config.get_text_config().hidden_size)
    for a, b in [(pairs[0], pairs[1]), (pairs[0], pairs[2]), (pairs[0], image_only[0])]:
        assert (a - b).abs().max() > 1e-4  # the text and the image both matter


def test_build_inputs_left_padded_ending_in_generation_prompt(loaded):
    _, processor, _ = loaded
    batch = build_inputs(processor, [{"text": t} for t in TEXTS] + [{"image": IMAGES[1], "text": "x"}])
    mask, ids = batch["attention_mask"], batch["input_ids"]
    assert (mask[:, -1] == 1).all() and (mask[:, 0] == 0).any()
    assert (mask[:, 1:] >= mask[:, :-1]).all()  # zeros only on the left
    assert (ids[mask == 0] == processor.tokenizer.pad_token_id).all()
    suffix = processor.tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    assert (ids[:, -len(suffix):] == torch.tensor(suffix)).all()
    instruction = processor.tokenizer.decode(ids[0][mask[0] == 1])
    assert "<|im_start|>user\n" + PROMPTS["text"].format(text=TEXTS[0]) + "<|im_end|>" in instruction


def test_prompt_worked_example(omni_dir):
    _, processor = backbone.load(omni_dir, device="cpu")
    batch = build_inputs(processor, [{"text": "hello"}])
    assert processor.tokenizer.decode(batch["input_ids"][0]) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nhello\nSummarize the above text in one word:<|im_end|>\n<|im_start|>assistant\n")
    assert backbone.chat_content({"audio": AUDIOS[0]}) == [
        {"type": "audio"}, {"type": "text", "text": "\nSummarize the above audio in one word:"}]
    assert backbone.chat_content({"video": VIDEOS[0], "text": ""})[-1]["text"] == PROMPTS["video"]
    assert backbone.chat_content({"image": IMAGES[0], "text": "cat"})[-1]["text"] == \
        "cat\nSummarize the above in one word:"


def test_bad_items(qwen2_vl_dir):
    _, processor = backbone.load(qwen2_vl_dir, device="cpu")
    with pytest.raises(ValueError, match="unknown item keys"):
        build_inputs(processor, [{"images": IMAGES[0]}])
    with pytest.raises(ValueError, match="nothing to embed"):
        build_inputs(processor, [{"text": None}])
    with pytest.raises(ValueError, match="no audio"):
        build_inputs(processor, [{"audio": AUDIOS[0]}])
    with pytest.raises(ValueError, match="no items"):
        build_inputs(processor, [])


def test_embed_batch_has_gradients(loaded):
    model, processor, _ = loaded
    model.train()
    try:
        emb = embed_batch(model, build_inputs(processor, [{"text": TEXTS[0]}, {"image": IMAGES[0]}]))
        assert emb.requires_grad
        (emb[0] @ emb[1]).backward()
        grads = [p.grad for n, p in model.named_parameters() if "layers.0." in n and p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads)
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


def test_load_rejects_missing_folder(tmp_path):
    for bad in ["/no/such/folder", "./missing-model", "a/b/c", "not a hub id"]:
        with pytest.raises(FileNotFoundError, match="no such folder"):
            backbone.load(bad)
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(NotADirectoryError, match="expected a model folder"):
        backbone.load(tmp_path / "weights.bin")
    # hub ids are passed through to from_pretrained untouched (nothing is downloaded here)
    assert sources.model_source("Qwen/Qwen2.5-Omni-3B") == "Qwen/Qwen2.5-Omni-3B"


def test_full_omni_checkpoint_loads_its_thinker(omni_dir, tmp_path):
    """A full Qwen2.5-Omni folder (thinker + talker + token2wav, weights named thinker.*)."""
    thinker = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(omni_dir)
    ids = thinker.config
    talker = dict(vocab_size=64, embedding_size=ids.text_config.hidden_size, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                  rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
                  tts_codec_start_token_id=60, tts_codec_end_token_id=61, tts_codec_pad_token_id=62,
                  tts_codec_mask_token_id=63, tts_text_start_token_id=0, tts_text_end_token_id=1,
                  tts_text_pad_token_id=2, vision_start_token_id=3, vision_end_token_id=4,
                  audio_start_token_id=5, audio_end_token_id=6)
    dit = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, head_dim=16, emb_dim=16, enc_emb_dim=16,
               enc_dim=16, enc_channels=[16, 16, 16, 16, 48], enc_attention_channels=8, enc_se_channels=8,
               num_embeds=64, mel_dim=8, look_ahead_layers=[0], look_backward_layers=[0])
    bigvgan = dict(mel_dim=8, upsample_initial_channel=16, resblock_kernel_sizes=[3],
                   resblock_dilation_sizes=[[1, 3, 5]], upsample_rates=[2, 2], upsample_kernel_sizes=[4, 4])
    config = Qwen2_5OmniConfig(thinker_config=thinker.config.to_dict(), talker_config=talker,
                               token2wav_config=dict(dit_config=dit, bigvgan_config=bigvgan))
    full = Qwen2_5OmniForConditionalGeneration(config)
    full.thinker.load_state_dict(thinker.state_dict())
    full.save_pretrained(tmp_path)
    Qwen2_5OmniProcessor.from_pretrained(omni_dir).save_pretrained(tmp_path)

    model, processor = backbone.load(tmp_path, device="cpu")
    assert isinstance(model, Qwen2_5OmniThinkerForConditionalGeneration)
    expected = thinker.state_dict()
    assert model.state_dict().keys() == expected.keys()
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
    reference = Embedder(*backbone.load(omni_dir, device="cpu"), progress=False).embed_texts(TEXTS)
    torch.testing.assert_close(Embedder(model, processor, progress=False).embed_texts(TEXTS), reference)


def test_from_pretrained_with_adapter(omni_dir, tmp_path):
    model, processor = backbone.load(omni_dir, device="cpu")
    base = Embedder(model, processor, progress=False).embed_texts(TEXTS)
    lora.add_lora(model, r=4, lora_alpha=8, lora_dropout=0.0)
    torch.manual_seed(1)
    for _, layer in lora.lora_layers(model):  # B starts at zero: make the adapter do something
        torch.nn.init.normal_(layer.lora_B.weight, std=0.05)
    adapted = Embedder(model, processor, progress=False).embed_texts(TEXTS)
    lora.save_adapter(model, tmp_path / "adapter")
    embedder = Embedder.from_pretrained(omni_dir, adapter=tmp_path / "adapter", device="cpu", progress=False)
    torch.testing.assert_close(embedder.embed_texts(TEXTS), adapted, atol=ATOL, rtol=0)
    assert (adapted - base).abs().max() > 1e-3


def test_whole_model_fallback_matches_decoder_path(loaded, monkeypatch):
    """Where `model.model` takes no pixels (older transformers), embed_batch runs the whole model."""
    model, processor, _ = loaded
    batch = build_inputs(processor, [{"text": TEXTS[0]}, {"image": IMAGES[1], "text": "x"}])
    with torch.no_grad():
        direct = embed_batch(model, batch, layers="all")
        monkeypatch.setattr(backbone, "multimodal_decoder", lambda m: None)
        whole = embed_batch(model, batch, layers="all")
    torch.testing.assert_close(whole, direct, atol=ATOL, rtol=0)


def test_generative_targets_label_only_the_answer(omni_dir):
    """build_inputs(targets=...) scores exactly the answer tokens + end of turn, for every row."""
    from lco_mini import backbone
    model, processor = backbone.load(omni_dir, device="cpu")
    from PIL import Image
    items = [{"text": "a red circle"}, {"image": Image.new("RGB", (64, 64), (200, 30, 30))}]
    targets = ["a red circle on the left", "red"]
    batch = backbone.build_inputs(processor, items, targets=targets)
    tok = processor.tokenizer
    for row, target in enumerate(targets):
        scored = batch["input_ids"][row][batch["labels"][row] != -100]
        assert tok.decode(scored) == target + "<|im_end|>"
        assert (batch["labels"][row] != -100).sum() == len(tok(target + "<|im_end|>", add_special_tokens=False)["input_ids"])
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    assert logits.shape[:2] == batch["input_ids"].shape


def test_instruction_replaces_the_embedding_prompt():
    """Generative pretraining asks other questions than the embedding prompt."""
    from lco_mini import backbone
    assert backbone.chat_content({"image": "x.png", "instruction": "Describe the above image."}) == [
        {"type": "image"}, {"type": "text", "text": "\nDescribe the above image."}]
    assert backbone.chat_content({"text": "a red circle", "instruction": "Rephrase the above text."})[-1] == {
        "type": "text", "text": "a red circle\nRephrase the above text."}
    assert backbone.chat_content({"text": "a red circle"})[-1]["text"] == (
        "a red circle\nSummarize the above text in one word:")


def test_input_kinds_per_family(loaded):
    model, processor, is_omni = loaded
    kinds = backbone.input_kinds(processor)
    assert kinds == (("text", "image", "video", "audio") if is_omni else ("text", "image", "video"))
    if not is_omni:  # the kinds it lacks are exactly the ones build_inputs refuses
        with pytest.raises(ValueError, match="takes no audio"):
            build_inputs(processor, [{"audio": AUDIOS[0]}])


def test_a_missing_path_is_no_such_folder_not_a_hub_id(tmp_path, monkeypatch):
    """A typo in a folder name must not cost half a minute of hub retries."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for typo in ["runs/mergd", "out/mergd"]:
        with pytest.raises(FileNotFoundError, match=f"{typo}: no such folder"):
            sources.model_source(typo)
    assert sources.model_source("Qwen/Qwen2.5-Omni-3B") == "Qwen/Qwen2.5-Omni-3B"  # may be a hub id


def test_texts_are_cut_to_max_text_tokens_but_the_prompt_is_kept(omni_dir):
    """One 1 MB text must not reach the model whole; the instruction and generation prompt stay."""
    processor = backbone.load_processor(omni_dir)
    long_text = "the red circle above the blue square " * 2000
    full = build_inputs(processor, [{"text": long_text}], max_text_tokens=None)["input_ids"]
    cut = build_inputs(processor, [{"text": long_text}], max_text_tokens=20)["input_ids"]
    short = build_inputs(processor, [{"text": "a dog"}], max_text_tokens=20)["input_ids"]
    assert full.shape[1] > 2000 and cut.shape[1] < short.shape[1] + 25
    assert torch.equal(cut[0, -8:], short[0, -8:])  # same instruction and generation prompt at the end
    targets = build_inputs(processor, [{"text": "a"}], targets=[long_text], max_text_tokens=20)
    assert (targets["labels"] != -100).sum() <= 22  # the answer is cut too (+ end of turn)
    assert backbone.truncate_text(processor.tokenizer, "a dog", 20) == ("a dog", False)


def test_embedder_counts_cut_texts(omni_dir):
    model, processor = backbone.load(omni_dir, device="cpu")
    embedder = Embedder(model, processor, progress=False, max_text_tokens=10)
    vectors = embedder.embed_texts(["a dog", "two stars " * 50, "two stars " * 60])
    assert embedder.truncated == 2
    torch.testing.assert_close(vectors[1], vectors[2], atol=ATOL, rtol=0)  # both cut to the same 10 tokens


def test_image_files_reach_the_processor_within_its_pixel_budget(omni_dir, tmp_path, monkeypatch):
    from lco_mini.support import media

    processor = backbone.load_processor(omni_dir)
    budget = backbone.image_budget(processor)
    _image(600, 400, 5).save(tmp_path / "big.png")
    seen = []
    real_loader = media.LOADERS["image"]
    monkeypatch.setitem(media.LOADERS, "image", lambda x: seen.append(real_loader(x)) or seen[-1])
    build_inputs(processor, [{"image": tmp_path / "big.png"}, {"image": IMAGES[0]}])
    assert budget == 128 * 128 and [img.width * img.height <= budget for img in seen] == [True, True]
    assert seen[1].size == IMAGES[0].size  # an image within the budget is left as it is


def test_a_36_megapixel_png_costs_little_more_memory_than_its_pixels(omni_dir, tmp_path):
    """Peak memory of build_inputs on a 6000 x 6000 PNG (108 MB of RGB): under 2x that, because the
    budget is applied right after decoding (it was 4.5x: the processor worked at full size)."""
    import subprocess
    import sys
    from pathlib import Path

    Image.new("RGB", (6000, 6000), (200, 30, 30)).save(tmp_path / "big.png", compress_level=1)
    probe = ("import resource, sys; from lco_mini import backbone; from transformers import AutoProcessor\n"
             "processor = AutoProcessor.from_pretrained(sys.argv[1])\n"
             "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
             "backbone.build_inputs(processor, [{'image': sys.argv[2]}])\n"
             "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n")
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", probe, str(omni_dir), str(tmp_path / "big.png")], cwd=root,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    grown_mb = int(result.stdout.split()[-1]) / 1024  # ru_maxrss is in KiB on Linux
    assert grown_mb < 2 * 6000 * 6000 * 3 / 2**20, f"{grown_mb:.0f} MB"
