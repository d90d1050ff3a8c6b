"""LoRA (low-rank adaptation), written out by hand.

The idea (Hu et al. 2021): fine-tuning changes a pretrained weight W (out x in)
by some dW, and that change is well approximated by a matrix of low rank r.
So freeze W and learn only a factorisation dW = B @ A, with A (r x in) and
B (out x r). A linear layer becomes

    y = W x + (lora_alpha / r) * B A dropout(x)

and trains r * (in + out) numbers instead of in * out (r = 64 on a 2048 x 2048
projection: 6% of the parameters, and no optimizer state for W at all).

Choices worth knowing, all the same as peft's so our files are peft's files:
  * B starts at zero, A at random (kaiming uniform). Then dW = 0 at step 0: the
    wrapped model is exactly the pretrained model, and training starts from it.
    A must not be zero too, or dL/dB = g (A x)^T and dL/dA = B^T g x^T would
    both vanish and nothing would ever move.
  * scaling = lora_alpha / r. With A random, B A x grows with r; dividing by r
    keeps the size of the update (and so the right learning rate) roughly the
    same whichever r you pick. lora_alpha is the knob; LCO-Emb uses r = 64,
    alpha = 128, i.e. scaling 2.
  * Only the language model is adapted. LCO-Emb's recipe trains on text only;
    the vision and audio towers stay frozen so the cross-modal alignment they
    learned in generative pretraining is kept, and lm_head is excluded because
    embeddings are pooled from the last hidden state, never from logits.
  * The update is linear, so it can be folded into W (merge): W' = W + s B A
    gives the same function with no extra cost at inference.

Adapter files use peft's format (adapter_model.safetensors with keys like
`base_model.model.<module>.lora_A.weight`, plus adapter_config.json), so
`peft.PeftModel.from_pretrained(base, dir)` loads what we save, and
`load_adapter` loads plain-LoRA adapters that peft saved.
"""
import json
import math
import os
import re

import torch
from safetensors.torch import load_file, save_file
from torch import nn

# A Linear whose dotted name contains any of these is left alone by default:
# the vision and audio towers (with their projectors/mergers, which live under
# the same names) and lm_head. Everything else is the language model.
DEFAULT_EXCLUDE = ("visual", "vision_tower", "vision_model", "audio_tower", "audio_model",
                   "lm_head", "multi_modal_projector")
ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"


class LoRALinear(nn.Module):
    """y = base_layer(x) + scaling * lora_B(lora_A(dropout(x))), base_layer frozen."""

    def __init__(self, base_layer: nn.Linear, r: int, lora_alpha: float, lora_dropout: float = 0.0):
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank r must be positive, got {r}")
        self.base_layer = base_layer  # attribute names match peft's, so state-dict keys line up
        self.r, self.lora_alpha, self.lora_dropout = r, lora_alpha, lora_dropout
        self.scaling = lora_alpha / r
        self.dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        # Like peft, keep half-precision bases' adapters in fp32: tiny updates to
        # small matrices are exactly what bf16 rounds away.
        weight = base_layer.weight
        dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        kw = dict(bias=False, device=weight.device, dtype=dtype)
        self.lora_A = nn.Linear(base_layer.in_features, r, **kw)  # weight: (r, in)
        self.lora_B = nn.Linear(r, base_layer.out_features, **kw)  # weight: (out, r)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)  # dW = 0: a fresh adapter changes nothing
        self.merged = False

    # Code that reads `layer.weight` (dtype checks, weight tying) still finds the base weight.
    @property
    def weight(self):
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A, the (out x in) change this adapter makes to the base weight."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    @torch.no_grad()
    def merge(self):
        """Fold the update into the base weight; forward then runs the base layer only."""
        if not self.merged:
            w = self.base_layer.weight
            w += self.delta_weight().to(w.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """Undo merge() (exact in fp32; in bf16 up to one rounding of W + dW)."""
        if self.merged:
            w = self.base_layer.weight
            w -= self.delta_weight().to(w.dtype)
            self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        lora_x = self.dropout(x.to(self.lora_A.weight.dtype))  # LoRA branch in the adapter's dtype
        return (result + self.lora_B(self.lora_A(lora_x)) * self.scaling).to(result.dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}, lora_alpha={self.lora_alpha}, lora_dropout={self.lora_dropout}, merged={self.merged}"


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    """All (dotted name, LoRALinear) pairs of a model."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def _selector(target):
    """Turn `target` (None, callable(name, module) -> bool, or regex strings) into a callable."""
    if target is None:
        return lambda name, module: not any(word in name for word in DEFAULT_EXCLUDE)
    if callable(target):
        return target
    patterns = [re.compile(p) for p in ([target] if isinstance(target, str) else target)]
    return lambda name, module: any(p.fullmatch(name) for p in patterns)  # fullmatch, as peft


def _replace(model: nn.Module, name: str, new: nn.Module):
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)


def add_lora(model: nn.Module, r: int = 64, lora_alpha: float = 128, lora_dropout: float = 0.05,
             target=None) -> list[str]:
    """Wrap the selected nn.Linear layers in LoRALinear and freeze everything else.

    target: None = every Linear whose name contains none of DEFAULT_EXCLUDE (the
    language model); a callable(name, module) -> bool; or regex strings, each
    matched against the whole dotted module name. Returns the wrapped names.
    """
    if lora_layers(model):
        raise ValueError("model already has LoRA layers; merge_lora() or start from the base model")
    select = _selector(target)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and select(n, m)]
    if not names:
        raise ValueError(f"add_lora: no nn.Linear module matched target={target!r}")
    for name in names:
        _replace(model, name, LoRALinear(model.get_submodule(name), r, lora_alpha, lora_dropout))
    for p in model.parameters():
        p.requires_grad_(False)
    for _, layer in lora_layers(model):
        layer.lora_A.weight.requires_grad_(True)
        layer.lora_B.weight.requires_grad_(True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"lora: {len(names)} linear layers wrapped, trainable {_count(trainable)} / "
          f"{_count(total)} params ({100 * trainable / total:.1f}%)")
    return names


def _count(n: int) -> str:
    """4096 -> '4.10K', 3_400_000_000 -> '3.40B': readable for tiny and real models alike."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the plain nn.Linear back (in place)."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("merge_lora: model has no LoRA layers")
    for name, layer in layers:
        layer.merge()
        _replace(model, name, layer.base_layer)
    return model


def _adapter_shapes(named_linears, r_of) -> dict[str, tuple]:
    """peft's file keys (`base_model.model.<name>.lora_A.weight`) -> expected tensor shapes."""
    shapes = {}
    for name, lin in named_linears:
        shapes[f"base_model.model.{name}.lora_A.weight"] = (r_of(name), lin.in_features)
        shapes[f"base_model.model.{name}.lora_B.weight"] = (lin.out_features, r_of(name))
    return shapes


def _peft_matches(targets, name: str) -> bool:
    """peft's rule: a regex string must fullmatch; list entries match the name or a '.'-suffix of it."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return name in targets or any(name.endswith("." + t) for t in targets)


def save_adapter(model: nn.Module, directory: str, base_model_name_or_path: str | None = None):
    """Write adapter_model.safetensors + adapter_config.json in peft's format."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("save_adapter: model has no LoRA layers")
    hyper = {(m.r, m.lora_alpha, m.lora_dropout) for _, m in layers}
    if len(hyper) > 1:  # peft would need rank_pattern/alpha_pattern; we keep one setting per model
        raise ValueError(f"save_adapter: LoRA layers disagree on (r, alpha, dropout): {sorted(hyper)}")
    (r, lora_alpha, lora_dropout), = hyper
    targets = sorted(n for n, _ in layers)
    # peft re-selects modules by name suffix on the *plain* model; check that picks exactly ours.
    wrapped = {id(m.base_layer) for _, m in layers}
    stray = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and id(m) not in wrapped
             and not n.endswith((".lora_A", ".lora_B")) and _peft_matches(targets, n)]
    if stray:
        raise ValueError(f"save_adapter: peft would also wrap {stray}; rename or wrap them too")
    tensors = {}
    for name, m in layers:
        tensors[f"base_model.model.{name}.lora_A.weight"] = m.lora_A.weight.detach().cpu().contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = m.lora_B.weight.detach().cpu().contiguous()
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    config = {  # the fields peft's LoraConfig writes that matter for plain LoRA
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model_name_or_path,
        "revision": None, "r": r, "lora_alpha": lora_alpha, "lora_dropout": lora_dropout,
        "target_modules": targets, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True, "use_rslora": False, "use_dora": False, "lora_bias": False,
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {}, "exclude_modules": None,
    }
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(directory, ADAPTER_CONFIG), "w") as f:
        json.dump(config, f, indent=2)


def _check_plain_lora(config: dict):
    """Refuse peft features this file does not implement, rather than load them wrongly."""
    unsupported = {"peft_type": config.get("peft_type") != "LORA", "bias": config.get("bias", "none") != "none"}
    for key in ("use_dora", "use_rslora", "fan_in_fan_out", "lora_bias", "modules_to_save", "rank_pattern",
                "alpha_pattern", "layers_to_transform", "exclude_modules"):
        unsupported[key] = bool(config.get(key))
    bad = [k for k, is_bad in unsupported.items() if is_bad]
    if bad:
        raise ValueError(f"load_adapter: unsupported adapter settings {({k: config.get(k) for k in bad})}")


def load_adapter(model: nn.Module, directory: str) -> nn.Module:
    """Load an adapter saved by save_adapter (or plain-LoRA peft) into `model`.

    A model without LoRA gets wrappers on the modules the config names (peft's
    matching rule, r/alpha/dropout from the config); one that has LoRA keeps its
    wrappers. Keys and shapes must fit exactly, else nothing changes and a
    ValueError names what differs.
    """
    with open(os.path.join(directory, ADAPTER_CONFIG)) as f:
        config = json.load(f)
    _check_plain_lora(config)
    try:
        tensors = load_file(os.path.join(directory, ADAPTER_WEIGHTS))
    except Exception as e:  # safetensors raises its own error type for a cut-short or foreign file
        raise ValueError(f"{os.path.join(directory, ADAPTER_WEIGHTS)}: not readable LoRA weights ({e})") from None
    layers = lora_layers(model)
    if any(m.merged for _, m in layers):
        raise ValueError("load_adapter: unmerge() the model's LoRA layers first")
    if layers:
        ranks = {n: m.r for n, m in layers}
        expected = _adapter_shapes([(n, m.base_layer) for n, m in layers], ranks.get)
    else:
        targets = config["target_modules"]
        linears = [(n, m) for n, m in model.named_modules()
                   if isinstance(m, nn.Linear) and _peft_matches(targets, n)]
        expected = _adapter_shapes(linears, lambda name: config["r"])
    missing, unexpected = sorted(expected.keys() - tensors.keys()), sorted(tensors.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(f"adapter in {directory} does not fit this model: "
                         f"missing keys {missing[:6]}{'...' if len(missing) > 6 else ''}, "
                         f"unexpected keys {unexpected[:6]}{'...' if len(unexpected) > 6 else ''}")
    wrong = [f"{k}: file {tuple(t.shape)} vs model {expected[k]}" for k, t in tensors.items()
             if tuple(t.shape) != expected[k]]
    if wrong:
        raise ValueError(f"adapter in {directory} has shapes that do not fit this model: {wrong[:6]}")
    if not layers:
        add_lora(model, config["r"], config["lora_alpha"], config.get("lora_dropout", 0.0),
                 target=lambda name, module: _peft_matches(targets, name))
    with torch.no_grad():
        for name, m in lora_layers(model):
            m.lora_A.weight.copy_(tensors[f"base_model.model.{name}.lora_A.weight"])
            m.lora_B.weight.copy_(tensors[f"base_model.model.{name}.lora_B.weight"])
    return model
