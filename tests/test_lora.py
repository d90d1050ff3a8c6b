"""Tests for lco_mini.lora: parity with peft (the reference LoRA), merge/unmerge,
peft-format adapter files both ways, and the language-model-only default.

All models are tiny and built from configs, so nothing is downloaded.
"""
import copy
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import (Qwen2_5OmniThinkerConfig, Qwen2_5OmniThinkerForConditionalGeneration, Qwen2Config,
                          Qwen2ForCausalLM, Qwen2VLConfig, Qwen2VLForConditionalGeneration)

from lco_mini.lora import LoRALinear, add_lora, load_adapter, lora_layers, merge_lora, save_adapter

TEXT = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, vocab_size=100)


def tiny_qwen2(seed=0, layers=2, hidden=32):
    torch.manual_seed(seed)
    cfg = Qwen2Config(**{**TEXT, "hidden_size": hidden}, num_hidden_layers=layers)
    return Qwen2ForCausalLM(cfg).eval()


def tiny_qwen2_vl(seed=0):
    torch.manual_seed(seed)
    cfg = Qwen2VLConfig(
        text_config=dict(**TEXT, num_hidden_layers=2,
                         rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}),
        vision_config=dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=4,
                           spatial_merge_size=2, temporal_patch_size=2))
    return Qwen2VLForConditionalGeneration(cfg).eval()


def tiny_omni_thinker(seed=0):
    torch.manual_seed(seed)
    cfg = Qwen2_5OmniThinkerConfig(
        text_config=dict(**TEXT, num_hidden_layers=1),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                           fullatt_block_indexes=[0]),
        audio_config=dict(d_model=16, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32,
                          output_dim=32, num_mel_bins=16))
    return Qwen2_5OmniThinkerForConditionalGeneration(cfg).eval()


IDS = torch.tensor([[5, 17, 42, 3, 99, 0, 64], [1, 2, 3, 4, 5, 6, 7]])


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def randomise_lora(model, seed=1):
    """A trained-looking adapter: B no longer zero (and A redrawn), so the update is visible."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for _, m in lora_layers(model):
            m.lora_A.weight.normal_(0, 0.2)
            m.lora_B.weight.normal_(0, 0.2)


def test_fresh_adapter_is_the_base_model(capsys):
    model = tiny_qwen2()
    before = logits(model)
    names = add_lora(model, r=4, lora_alpha=8, lora_dropout=0.0)
    assert len(names) == 14  # 7 projections x 2 layers, lm_head excluded
    layer = model.get_submodule("model.layers.0.mlp.down_proj")
    assert isinstance(layer, LoRALinear) and layer.scaling == 2.0
    assert layer.lora_A.weight.shape == (4, 64) and layer.lora_B.weight.shape == (32, 4)
    assert layer.lora_A.weight.abs().sum() > 0 and layer.lora_B.weight.abs().sum() == 0
    assert torch.equal(logits(model), before)  # B = 0: adding the LoRA branch adds exactly zero
    # 14 layers x 4 x (in + out): q,o 64*2, k,v 48*2, gate,up,down 96*3 = 2 x (128+96+288) x 4 = 4096
    total = sum(p.numel() for p in model.parameters())
    assert capsys.readouterr().out == (f"lora: 14 linear layers wrapped, trainable 4.10K / {total / 1e3:.2f}K "
                                       f"params ({100 * 4096 / total:.1f}%)\n")


def test_only_lora_parameters_train():
    model = tiny_qwen2()
    add_lora(model, r=4, lora_alpha=8)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".lora_A.weight", ".lora_B.weight")) for n in trainable)
    assert len(trainable) == 28
    assert sum(model.get_parameter(n).numel() for n in trainable) == 4096
    # and gradients really reach them (B = 0 still gives B a gradient, because A x != 0)
    model(input_ids=IDS).logits.square().mean().backward()
    assert model.get_submodule("model.layers.1.self_attn.v_proj").lora_B.weight.grad.abs().sum() > 0


def test_merge_equals_unmerged_and_unmerge_restores():
    model = tiny_qwen2()
    base_weight = model.get_submodule("model.layers.0.self_attn.q_proj").weight.clone()
    add_lora(model, r=4, lora_alpha=8, lora_dropout=0.0)
    randomise_lora(model)
    unmerged = logits(model)
    assert not torch.allclose(unmerged, logits(tiny_qwen2()), atol=1e-3)  # the adapter does something
    for _, m in lora_layers(model):
        m.merge()
    q = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert q.merged and not torch.equal(q.weight, base_weight)
    torch.testing.assert_close(logits(model), unmerged, atol=1e-5, rtol=0)
    for _, m in lora_layers(model):
        m.unmerge()
    torch.testing.assert_close(q.weight, base_weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(model), unmerged, atol=1e-5, rtol=0)


def test_merge_lora_returns_a_plain_model():
    model = tiny_qwen2()
    add_lora(model, r=4, lora_alpha=8, lora_dropout=0.0)
    randomise_lora(model)
    unmerged = logits(model)
    merged = merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert type(merged.get_submodule("model.layers.0.self_attn.q_proj")) is torch.nn.Linear
    assert not any("lora" in k or "base_layer" in k for k in merged.state_dict())
    torch.testing.assert_close(logits(merged), unmerged, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="no LoRA layers"):
        merge_lora(merged)


# bf16: the same casts in the same order as peft (fp32 adapter, add in fp32, cast back) give
# bit-identical logits; any other order would round differently, so atol is 0 there.
@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.bfloat16, 0.0)])
def test_forward_matches_peft(dtype, atol):
    model = tiny_qwen2().to(dtype)
    reference = copy.deepcopy(model)
    names = add_lora(model, r=4, lora_alpha=16, lora_dropout=0.0)
    randomise_lora(model)
    peft_model = get_peft_model(reference, LoraConfig(r=4, lora_alpha=16, lora_dropout=0.0, target_modules=names))
    with torch.no_grad():
        for name, m in lora_layers(model):
            theirs = peft_model.base_model.model.get_submodule(name)
            # Both keep half-precision bases' adapters in fp32.
            assert theirs.lora_A["default"].weight.dtype == m.lora_A.weight.dtype == torch.float32
            theirs.lora_A["default"].weight.copy_(m.lora_A.weight)
            theirs.lora_B["default"].weight.copy_(m.lora_B.weight)
    ours, expected = logits(model), logits(peft_model)
    assert ours.dtype == dtype
    torch.testing.assert_close(ours.float(), expected.float(), atol=atol, rtol=0)


def test_dropout_only_in_train_mode():
    model = tiny_qwen2()
    add_lora(model, r=4, lora_alpha=8, lora_dropout=0.5)
    randomise_lora(model)
    model.train()
    assert not torch.allclose(model(input_ids=IDS).logits, model(input_ids=IDS).logits)
    model.eval()
    assert torch.equal(logits(model), logits(model))


def test_save_load_round_trip(tmp_path):
    model = tiny_qwen2()
    add_lora(model, r=4, lora_alpha=8, lora_dropout=0.1)
    randomise_lora(model)
    model.eval()
    save_adapter(model, tmp_path, base_model_name_or_path="tiny/qwen2")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["lora_dropout"] == 0.1 and config["base_model_name_or_path"] == "tiny/qwen2"
    assert "model.layers.1.mlp.up_proj" in config["target_modules"] and len(config["target_modules"]) == 14
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert len(tensors) == 28
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 32)

    fresh = tiny_qwen2()  # same seed: same base weights, no LoRA yet
    load_adapter(fresh, tmp_path)
    assert sorted(n for n, _ in lora_layers(fresh)) == config["target_modules"]
    assert all(m.lora_dropout == 0.1 for _, m in lora_layers(fresh))
    assert torch.equal(logits(fresh.eval()), logits(model))
    # loading into a model that already has (other) LoRA weights overwrites them
    other = tiny_qwen2()
    add_lora(other, r=4, lora_alpha=8)
    load_adapter(other, tmp_path)
    assert torch.equal(logits(other.eval()), logits(model))


@pytest.mark.parametrize("build", [tiny_qwen2, tiny_qwen2_vl])
def test_peft_loads_our_adapter(tmp_path, build):
    model = build()
    add_lora(model, r=4, lora_alpha=8, lora_dropout=0.0)
    randomise_lora(model)
    save_adapter(model, tmp_path)
    peft_model = PeftModel.from_pretrained(build(), tmp_path).eval()
    torch.testing.assert_close(logits(peft_model), logits(model), atol=1e-5, rtol=0)


def test_we_load_a_peft_adapter(tmp_path):
    # peft's usual style: short names matched as suffixes ("q_proj" = every *.q_proj)
    peft_model = get_peft_model(tiny_qwen2(), LoraConfig(r=2, lora_alpha=3, target_modules=["q_proj", "down_proj"],
                                                         init_lora_weights=False))  # random B
    peft_model.save_pretrained(tmp_path)
    model = tiny_qwen2()
    load_adapter(model, tmp_path)
    assert sorted(n for n, _ in lora_layers(model)) == [
        "model.layers.0.mlp.down_proj", "model.layers.0.self_attn.q_proj",
        "model.layers.1.mlp.down_proj", "model.layers.1.self_attn.q_proj"]
    assert lora_layers(model)[0][1].scaling == 1.5
    torch.testing.assert_close(logits(model), logits(peft_model.eval()), atol=1e-5, rtol=0)


def test_load_adapter_into_mismatching_model_fails_clearly(tmp_path):
    model = tiny_qwen2(layers=2)
    add_lora(model, r=4, lora_alpha=8)
    save_adapter(model, tmp_path)
    one_layer = tiny_qwen2(layers=1)
    with pytest.raises(ValueError, match=r"unexpected keys \['base_model\.model\.model\.layers\.1\."):
        load_adapter(one_layer, tmp_path)
    assert not lora_layers(one_layer)  # a failed load leaves the model untouched
    with pytest.raises(ValueError, match=r"shapes .*gate_proj\.lora_A\.weight: file \(4, 32\) vs model \(4, 48\)"):
        load_adapter(tiny_qwen2(hidden=48), tmp_path)
    wrong_rank = tiny_qwen2()
    add_lora(wrong_rank, r=2, lora_alpha=8)
    with pytest.raises(ValueError, match=r"down_proj\.lora_A\.weight: file \(4, 64\) vs model \(2, 64\)"):
        load_adapter(wrong_rank, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ValueError, match="unsupported adapter settings.*use_dora"):
        load_adapter(tiny_qwen2(), tmp_path)


@pytest.mark.parametrize("build, towers", [(tiny_qwen2_vl, ("visual",)),
                                           (tiny_omni_thinker, ("visual", "audio_tower"))])
def test_default_wraps_only_the_language_model(build, towers):
    model = build()
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert any(t in n for n in linears for t in towers)  # the towers are there to be skipped
    wrapped = add_lora(model, r=2, lora_alpha=4)
    assert wrapped == [n for n in linears if n.startswith("model.language_model.")]
    assert type(model.lm_head) is torch.nn.Linear
    for tower in towers:
        assert not any(isinstance(m, LoRALinear) for m in model.model.get_submodule(tower).modules())
        assert not any(p.requires_grad for p in model.model.get_submodule(tower).parameters())


def test_target_regex_callable_and_errors():
    model = tiny_qwen2()
    assert add_lora(model, r=2, lora_alpha=2, target=[r".*\.q_proj"]) == [
        "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    with pytest.raises(ValueError, match="already has LoRA"):
        add_lora(model)
    model = tiny_qwen2()
    assert add_lora(model, r=2, lora_alpha=2, target=lambda name, m: m.out_features == 64) == [
        "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj",
        "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"]
    with pytest.raises(ValueError, match="no nn.Linear module matched"):
        add_lora(tiny_qwen2(), target=["q_proj"])  # fullmatch: a bare suffix matches nothing
