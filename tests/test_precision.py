"""--precision: which arithmetic a run chooses, bf16 autocast against fp32 on the same batch,
and --profile-steps (the phase split of a step) leaving nothing behind."""
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402
from lco_mini import backbone, loop, losses
from lco_mini.interop import export
from lco_mini.support import precision
from lco_mini.tiny import tasks  # noqa: E402
from conftest import train_here  # noqa: E402
from test_train import SMOKE, run_train  # noqa: E402

ZEN4 = "processor : 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"
SKYLAKE = "processor : 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n"
SAPPHIRE = "flags : fpu avx512f amx_bf16 amx_tile\n"


def test_cpu_flag_is_read_from_cpuinfo():
    assert precision.cpu_bf16_flag(ZEN4) == "avx512_bf16"
    assert precision.cpu_bf16_flag(SAPPHIRE) == "amx_bf16"
    assert precision.cpu_bf16_flag(SKYLAKE) is None
    assert precision.cpu_bf16_flag("") is None  # macOS, Windows: no /proc/cpuinfo


@pytest.mark.parametrize("requested, device, cpuinfo, expected", [
    ("auto", "cpu", ZEN4, "bf16"),
    ("auto", "cpu", SAPPHIRE, "bf16"),
    ("auto", "cpu", SKYLAKE, "fp32"),  # emulated bf16 would be slower than fp32
    ("auto", "cuda", SKYLAKE, "bf16"),  # an Ampere or later GPU (cuda_native=True below)
    ("fp32", "cpu", ZEN4, "fp32"),
    ("bf16", "cpu", SKYLAKE, "bf16"),  # asked for: allowed, only slower
])
def test_choose(requested, device, cpuinfo, expected):
    chosen, why = precision.choose(requested, torch.device(device), cpuinfo, cuda_native=True)
    assert chosen == expected and why


def test_auto_takes_fp32_on_a_gpu_without_bf16_tensor_cores():
    assert precision.choose("auto", torch.device("cuda"), cuda_native=False) == ("fp32", "this GPU has no native bf16")


def test_choose_refuses_an_unknown_precision():
    with pytest.raises(ValueError, match="precision must be one of auto, bf16, fp32"):
        precision.choose("fp16", torch.device("cpu"), ZEN4)


def test_tests_run_in_fp32():
    assert precision.DEFAULT == "fp32" and train.get_args([]).precision == "fp32"


def test_a_bad_environment_value_is_a_one_line_error(tmp_path):
    result = run_train(["--out", str(tmp_path / "run")], env_extra={"LCO_MINI_PRECISION": "fp8"})
    assert result.returncode == 2 and "--precision must be one of auto, bf16, fp32; got 'fp8'" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()


def examples(n=6, seed=3):
    return tasks.world_caption_examples(n, seed)


def test_bf16_autocast_is_close_to_fp32_and_keeps_fp32_weights(omni_dir):
    model, processor = backbone.load(omni_dir, device="cpu", dtype=torch.float32)
    cpu = torch.device("cpu")
    exact = losses.generative_loss(model, losses.generative_inputs(processor, examples()), cpu, "fp32")
    mixed = losses.generative_loss(model, losses.generative_inputs(processor, examples()), cpu, "bf16")
    assert mixed.dtype == torch.float32 and all(p.dtype == torch.float32 for p in model.parameters())
    assert mixed.item() == pytest.approx(exact.item(), rel=2e-2) and mixed.item() != exact.item()
    items = [item for item, _ in examples()]
    a = losses.embed_items(model, processor, items, cpu, precision_used="fp32")
    b = losses.embed_items(model, processor, items, cpu, precision_used="bf16")
    assert b.dtype == torch.float32 and torch.allclose(b.norm(dim=-1), torch.ones(len(items)), atol=1e-5)
    assert (a * b).sum(-1).min() > 0.99  # cosine of each bf16 embedding with its fp32 one


def test_phase_timer_summary():
    timer = loop.PhaseTimer()
    timer.seconds.update({"forward": 0.3, "backward": 0.6, "optimizer": 0.1})
    assert timer.summary(2) == "500 ms/step = forward 150 ms (30%), backward 300 ms (60%), optimizer 50 ms (10%)"


def test_profile_steps_prints_the_phases_and_keeps_nothing(tmp_path):
    out, scratch = tmp_path / "run", tmp_path / "tmp"
    scratch.mkdir()
    result = train_here([*SMOKE, "--profile-steps", "3", "--out", str(out)], env={"TMPDIR": str(scratch)})
    assert result.returncode == 0, result.stderr[-3000:]
    for stage in ("pretrain", "contrastive"):
        line = next(l for l in result.stdout.splitlines() if l.startswith(f"{stage}: where a step's time went"))
        assert "(mean of 2 steps)" in line
        for phase in ("data", "processor", "forward", "backward", "optimizer"):
            assert f" {phase} " in line, (phase, line)
    assert not out.exists() and "held-out retrieval" not in result.stdout
    assert list(scratch.iterdir()) == []  # the scratch folder (in TMPDIR) is gone too


def test_profile_steps_refuses_resume(tmp_path):
    result = train_here([*SMOKE, "--profile-steps", "3", "--resume", "--out", str(tmp_path)])
    assert result.returncode == 2 and "cannot --resume" in result.stderr


def test_the_run_config_records_the_precision_used(tmp_path):
    out = tmp_path / "run"
    result = train_here([*SMOKE, "--stage", "pretrain", "--pretrain-steps", "2", "--precision", "bf16",
                         "--out", str(out)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "run_config.json").read_text())["precision"] == "bf16"
    assert "precision bf16 (asked for)" in result.stdout


def full_logits_loss(model, inputs):
    """The textbook next-token loss: logits at every position, shifted by one (an independent reference)."""
    inputs = dict(inputs)
    labels = inputs.pop("labels")
    logits = model(**inputs, use_cache=False).logits.float()
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


@pytest.mark.parametrize("family", ["omni", "qwen2_vl"])
def test_generative_loss_on_the_answer_positions_equals_the_full_logits_loss(family, omni_dir, qwen2_vl_dir,
                                                                           monkeypatch):
    folder = omni_dir if family == "omni" else qwen2_vl_dir
    model, processor = backbone.load(folder, device="cpu")
    from PIL import Image
    items = [{"text": "a red circle"}, {"image": Image.new("RGB", (64, 64), (200, 30, 30))},
             {"text": "two small yellow stars, one big star and a long tail of words"}]
    targets = ["a red circle on the left", "red", "stars"]  # answers of different lengths
    cpu = torch.device("cpu")
    with torch.no_grad():
        reference = full_logits_loss(model, backbone.build_inputs(processor, items, targets=targets))
        fast = losses.generative_loss(model, backbone.build_inputs(processor, items, targets=targets), cpu)
        monkeypatch.setattr(backbone, "multimodal_decoder", lambda m: None)  # the whole-model path
        whole = losses.generative_loss(model, backbone.build_inputs(processor, items, targets=targets), cpu)
    torch.testing.assert_close(fast, reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(whole, reference, atol=1e-5, rtol=0)


def test_saved_models_keep_their_attention_implementation(omni_dir, tmp_path):
    model, processor = backbone.load(omni_dir, device="cpu")
    assert model.config._attn_implementation == "eager"  # what tiny.build_tiny recorded
    export.save_model(model, processor, tmp_path / "copy")
    again, _ = backbone.load(tmp_path / "copy", device="cpu")
    assert again.config._attn_implementation == "eager"
    model.set_attn_implementation("sdpa")
    export.save_model(model, processor, tmp_path / "copy")
    assert json.loads((tmp_path / "copy" / "config.json").read_text())["attn_implementation"] == "sdpa"


def test_fused_adamw_matches_the_reference_adamw():
    torch.manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    copies = [torch.nn.Parameter(w.detach().clone()) for w in weights]
    fused = torch.optim.AdamW(weights, lr=1e-2, fused=True)
    plain = torch.optim.AdamW(copies, lr=1e-2, foreach=False)
    for step in range(5):
        for w, c in zip(weights, copies):
            w.grad = torch.randn_like(w)
            c.grad = w.grad.clone()
        fused.step()
        plain.step()
    for w, c in zip(weights, copies):
        torch.testing.assert_close(w, c, atol=1e-6, rtol=0)
    run = loop.Run("x", torch.nn.Linear(2, 2), train.get_args([]), Path("unused.pt"), 3, 1e-3, 1, 1, "items")
    assert run.optimizer.defaults["fused"] is True


def test_bf16_copy_hands_fp32_gradients_to_the_master_and_takes_its_weights_back():
    torch.manual_seed(0)
    master = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))
    copy = precision.Bf16Copy(master)
    assert all(p.dtype == torch.bfloat16 for p in copy.model.parameters())
    assert all(p.dtype == torch.float32 for p in master.parameters())
    x = torch.randn(5, 4, dtype=torch.bfloat16)
    copy.model[1](copy.model[0](x)).sum().backward()  # the last layer gets no gradient
    expected = [None if p.grad is None else p.grad.float() for p in copy.model.parameters()]
    copy.grads_to_master()
    for got, want, working in zip(master.parameters(), expected, copy.model.parameters()):
        assert working.grad is None
        assert (got.grad is None) if want is None else (got.grad.dtype == torch.float32 and torch.equal(got.grad, want))
    optimizer = torch.optim.AdamW(master.parameters(), lr=1e-3)
    optimizer.step()  # an update far below bf16's resolution for weights near 1
    copy.weights_from_master()
    for weight, working in zip(master.parameters(), copy.model.parameters()):
        assert torch.equal(working, weight.to(torch.bfloat16))


def test_resume_refuses_another_precision(tmp_path):
    """A resumed run must compute what the interrupted one did; "auto" is recorded as what it chose."""
    out = tmp_path / "run"
    args = [*SMOKE, "--stage", "pretrain", "--pretrain-steps", "3", "--out", str(out)]
    first = train_here([*args, "--precision", "bf16"])
    assert first.returncode == 0, first.stderr[-3000:]
    again = train_here([*args, "--precision", "fp32", "--resume"])
    assert again.returncode == 2 and "precision 'bf16' -> 'fp32'" in again.stderr, again.stderr[-2000:]
