"""train.py end to end on the smoke-size tiny model: both stages, evaluation, outputs,
resume after SIGKILL, data errors, NaN handling, and GradCache = full-batch loss. Runs go through
conftest.train_here (train.py's cli in this process, as `python train.py` runs it); the process
itself is started where it matters: killed mid-run, and torch's OpenMP setting before torch loads."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402
from lco_mini import backbone, lora, loop, losses
from lco_mini.embedder import Embedder
from lco_mini.experiments import evaluation
from lco_mini.tiny import model as tiny, tasks  # noqa: E402
from conftest import train_here  # noqa: E402

SMOKE = ["--tiny-size", "smoke", "--pretrain-batch", "8", "--batch-size", "8", "--log-every", "1"]


def run_train(args, timeout=300, env_extra=None, **kwargs):
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env_extra or {})}
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env, **kwargs)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    result = train_here([*SMOKE, "--out", str(out), "--pretrain-steps", "6", "--steps", "4", "--eval-n", "12",
                         "--ckpt-every", "3"])
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result.stdout


def test_smoke_run_writes_everything_and_evaluates(smoke_run):
    out, stdout = smoke_run
    for folder in ["base", "adapter", "merged"]:
        assert (out / folder).is_dir(), folder
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    config = json.loads((out / "run_config.json").read_text())
    assert config["temperature"] == 0.03 and config["steps"] == 4
    results = json.loads((out / "eval.json").read_text())
    assert set(results) == {"(a) base", "(b) text-only CL", "(c) control: CL, no pretrain"}
    for run in results.values():
        assert set(run) == {"text->text", "image->text", "video->text", "audio->text", "document->text"}
        for scores in run.values():
            assert scores["n"] == 12 and 1 < scores["candidates"] <= 12
    # the saved numbers are what the saved model gives, evaluated again here from its folder
    embedder = Embedder.from_pretrained(out / "merged", device="cpu", progress=False)
    again = evaluation.evaluate(embedder, n=12, seed=0 + 1234)
    for task, scores in again.items():
        assert results["(b) text-only CL"][task] == pytest.approx(scores), task
    assert "16 cands/anchor" in stdout  # batch 8 x (1 positive + 1 hard negative)
    assert "held-out retrieval" in stdout and "image->text" in stdout


def test_merged_equals_base_plus_adapter_also_in_peft(smoke_run):
    """The three ways to use the result give the same embeddings: merged folder,
    base + our adapter, base + the adapter loaded by peft."""
    import peft

    out, _ = smoke_run
    texts = ["a red circle on the left", "a low whistle, flat, pulsing"]
    merged = Embedder.from_pretrained(out / "merged", device="cpu", progress=False).embed_texts(texts)
    ours = Embedder.from_pretrained(out / "base", adapter=out / "adapter", device="cpu",
                                             progress=False).embed_texts(texts)
    model, processor = backbone.load(out / "base", device="cpu")
    peft_model = peft.PeftModel.from_pretrained(model, out / "adapter").eval()
    theirs = Embedder(peft_model.base_model.model, processor, progress=False).embed_texts(texts)
    torch.testing.assert_close(ours, merged, atol=1e-5, rtol=0)
    torch.testing.assert_close(theirs, merged, atol=1e-5, rtol=0)
    assert not torch.allclose(merged, Embedder(*backbone.load(out / "base", device="cpu"),
                                                        progress=False).embed_texts(texts))  # CL changed it


def test_existing_run_is_not_overwritten(smoke_run):
    out, _ = smoke_run
    result = train_here([*SMOKE, "--out", str(out), "--pretrain-steps", "1", "--steps", "1"])
    assert result.returncode == 2
    assert "already holds a run" in result.stderr and "--resume" in result.stderr


def test_contrastive_stage_alone_on_a_runs_base_gives_the_runs_adapter(smoke_run, tmp_path):
    """`--stage contrastive` on a run's base starts from the random state in which the run's pretraining
    ended (its pretrain.ckpt.pt), so it draws the same LoRA initialisation and batches and writes the
    same adapter as the whole run did. Without that checkpoint it starts from the seed: another adapter."""
    from safetensors.torch import load_file

    out, _ = smoke_run
    expected = load_file(out / "adapter" / "adapter_model.safetensors")
    adapters = {}
    for name, files in {"with": ["base", "pretrain.ckpt.pt"], "without": ["base"]}.items():
        alone = tmp_path / name
        alone.mkdir()
        for file in files:
            (alone / file).symlink_to(out / file)
        result = train_here([*SMOKE, "--stage", "contrastive", "--steps", "4", "--no-eval", "--out", str(alone)])
        assert result.returncode == 0, result.stderr[-3000:]
        assert ("random state from" in result.stdout) == (name == "with")
        adapters[name] = load_file(alone / "adapter" / "adapter_model.safetensors")
    assert adapters["with"].keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(adapters["with"][key], expected[key], atol=0, rtol=0)
    assert not all(torch.equal(adapters["without"][key], expected[key]) for key in expected)


def test_bad_jsonl_is_reported_before_training(smoke_run, tmp_path):
    out, _ = smoke_run
    bad = tmp_path / "pairs.jsonl"
    good = {"anchor": {"text": "a"}, "positive": {"text": "b"}, "negative": {"text": "c"}}
    bad.write_text(json.dumps(good) + "\n{broken\n")
    result = train_here(["--model", str(out / "base"), "--stage", "contrastive", "--data", str(bad),
                         "--out", str(tmp_path / "o"), "--steps", "1"])
    assert result.returncode == 2
    assert "line 2: not valid JSON" in result.stderr and str(bad) in result.stderr
    assert "Traceback" not in result.stderr
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps({"anchor": {"image_path": "nope.png"}, "positive": {"text": "b"}}) + "\n")
    result = train_here(["--model", str(out / "base"), "--stage", "contrastive", "--data", str(missing),
                         "--out", str(tmp_path / "o2"), "--steps", "1", "--no-hard-negatives"])
    assert result.returncode == 2 and "line 1" in result.stderr and "nope.png" in result.stderr


def checkpoint_step(path: Path) -> int:
    try:
        return torch.load(path, weights_only=False)["step"]
    except Exception:  # not written yet
        return 0


@pytest.mark.parametrize("precision", ["fp32", "bf16"])  # bf16: the bf16 copy is rebuilt from the fp32 weights
def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path, precision):
    args = [*SMOKE, "--stage", "pretrain", "--pretrain-steps", "10", "--ckpt-every", "2", "--precision", precision]
    full = train_here([*args, "--out", str(tmp_path / "full")])  # the uninterrupted run, in this process
    assert full.returncode == 0, full.stderr[-2000:]
    expected = torch.load(tmp_path / "full" / "pretrain.ckpt.pt", weights_only=False)["losses"]

    out = tmp_path / "killed"  # a process, to be killed
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args, "--out", str(out)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while checkpoint_step(out / "pretrain.ckpt.pt") < 4 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = checkpoint_step(out / "pretrain.ckpt.pt")
    assert 4 <= killed_at < 10, f"the run was not interrupted mid-training (checkpoint at step {killed_at})"

    resumed = train_here([*args, "--out", str(out), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {out / 'pretrain.ckpt.pt'} at step" in resumed.stdout
    losses = torch.load(out / "pretrain.ckpt.pt", weights_only=False)["losses"]
    assert len(losses) == 10
    assert losses == pytest.approx(expected, rel=1e-4, abs=1e-5)


@pytest.fixture(scope="module")
def smoke_model(tmp_path_factory):
    folder = tiny.build_tiny(tmp_path_factory.mktemp("init"), seed=0, **tiny.SIZES["smoke"])
    return backbone.load(folder, device="cpu")


def full_batch_loss(model, processor, triples, args) -> torch.Tensor:
    """What run_contrastive's loop does for one batch without --micro-batch: forward, loss, backward."""
    items = losses.batch_items(triples, args.hard_negatives)
    loss = losses.batch_loss(losses.embed_items(model, processor, items, torch.device("cpu")), len(triples),
                             args.temperature)
    loss.backward()
    return loss.detach()


def test_contrastive_loss_decreases_on_a_fixed_batch(smoke_model):
    model, processor = smoke_model
    lora.add_lora(model, r=8, lora_alpha=16, lora_dropout=0.0)
    args = train.get_args(["--batch-size", "12"])
    triples = tasks.world_pair_examples(12, seed=3, multimodal_ratio=0.0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(15):
        losses.append(full_batch_loss(model, processor, triples, args).item())
        optimizer.step()
        optimizer.zero_grad()
    lora.merge_lora(model)
    assert losses[-1] < 0.5 * losses[0], losses


def test_gradcache_gives_the_full_batch_loss_and_gradients(tmp_path):
    """Micro-batches with GradCache = one big batch: same loss, same gradients."""
    folder = tiny.build_tiny(tmp_path / "m", seed=0, **tiny.SIZES["smoke"])
    model, processor = backbone.load(folder, device="cpu")
    lora.add_lora(model, r=4, lora_alpha=8, lora_dropout=0.0)
    torch.manual_seed(0)
    for layer in lora.lora_layers(model):
        torch.nn.init.normal_(layer[1].lora_B.weight, std=0.02)  # non-zero B: gradients reach A too
    triples = tasks.world_pair_examples(6, seed=1, multimodal_ratio=0.0)
    results = []
    for micro in (0, 5):
        args = train.get_args(["--micro-batch", str(micro)])
        loss = (losses.gradcache(model, processor, triples, torch.device("cpu"), micro) if micro
                else full_batch_loss(model, processor, triples, args))
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        model.zero_grad()
        results.append((loss, grads))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=0)
    for full, cached in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(full, cached, atol=1e-5, rtol=1e-4)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    model = torch.nn.Linear(3, 1)
    args = train.get_args(["--out", str(tmp_path), "--ckpt-every", "2", "--warmup", "1"])
    ckpt = tmp_path / "x.ckpt.pt"

    run = loop.Run("x", model, args, ckpt, steps=6, peak_lr=1e-2, warmup=args.warmup, items_per_step=1, unit="x")
    with pytest.raises(loop.TrainingError, match="loss became nan at step 3"):
        for step in run.resume():
            lr = run.set_lr(step)
            loss = model(torch.ones(1, 3)).sum() * (math.nan if step == 3 else 1.0)
            loss.backward()
            run.optimizer_step(step, loss.detach())
            run.log_and_checkpoint(step, lr)
    assert torch.load(ckpt, weights_only=False)["step"] == 2  # the good checkpoint survived


def test_lr_schedule_warms_up_then_decays():
    lrs = [loop.get_lr(s, 1.0, 10, 100) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] == pytest.approx(0.1, abs=1e-3)


def test_pretraining_examples_use_generic_instructions_not_the_embedding_prompt():
    examples = tasks.world_caption_examples(40, seed=0)
    assert len(examples) == 40
    for item, target in examples:
        assert item["instruction"] in tasks.DESCRIBE.values() and "one word" not in item["instruction"]
        assert target.strip()
    kinds = {next(k for k in ("image", "video", "audio", "text") if k in item) for item, _ in examples}
    assert kinds == {"image", "video", "audio", "text"}
    again = tasks.world_caption_examples(40, seed=0)  # deterministic per seed
    assert [(sorted(i), t) for i, t in again] == [(sorted(i), t) for i, t in examples]


def test_pretrain_mix_flag_sets_shares_and_rejects_bad_input(capsys):
    mix = train.get_args(["--pretrain-mix", "audio=0.45,document=0"]).pretrain_mix
    assert set(mix) == set(tasks.PRETRAIN_MIX) and sum(mix.values()) == pytest.approx(1.0)
    rest = sum(share for m, share in tasks.PRETRAIN_MIX.items() if m not in ("audio", "document"))
    assert mix["document"] == 0 and mix["audio"] == pytest.approx(0.45 / (0.45 + rest))
    assert mix["image"] / mix["text"] == pytest.approx(tasks.PRETRAIN_MIX["image"] / tasks.PRETRAIN_MIX["text"])
    assert train.get_args([]).pretrain_mix == tasks.PRETRAIN_MIX
    for bad, message in [("smell=0.2", "unknown modality 'smell'"), ("audio=lots", "is not MODALITY=SHARE"),
                         ("audio=-1", "finite number >= 0"),
                         ("image=0,video=0,audio=0,document=0,text=0", "all zeros")]:
        with pytest.raises(SystemExit) as exit_info:
            train.get_args(["--pretrain-mix", bad])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    only_audio = {m: float(m == "audio") for m in tasks.PRETRAIN_MIX}
    examples = tasks.world_caption_examples(12, seed=0, mix=only_audio)
    assert len(examples) == 12 and all("audio" in item and item["instruction"] == tasks.DESCRIBE["audio"]
                                       for item, _ in examples)


# How torch's OpenMP threads wait is read once, when torch loads libgomp: the scripts must set it
# before anything imports torch, and must leave what the user set alone: a spin count, or a wait
# policy (with OMP_WAIT_POLICY=PASSIVE and a spin count set too, libgomp would still spin).
# The probe stops the script at its first import of torch and prints the setting there, which is
# what libgomp reads: loading torch and the rest of the script's imports would add seconds, no check.
SPIN_PROBE = """
import builtins, os, runpy, sys
real_import = builtins.__import__
def guarded(name, *args, **kwargs):
    if name.split(".")[0] == "torch" and not {"GOMP_SPINCOUNT", "OMP_WAIT_POLICY"} & set(os.environ):
        sys.exit("torch was imported before GOMP_SPINCOUNT was set")
    if name.split(".")[0] == "torch" and "torch" not in sys.modules:  # torch (and libgomp) would load now
        print(os.environ.get("GOMP_SPINCOUNT", "unset"), flush=True)
        os._exit(0)
    return real_import(name, *args, **kwargs)
builtins.__import__ = guarded
runpy.run_path(sys.argv[1], run_name="imported")
print(os.environ.get("GOMP_SPINCOUNT", "unset"))
"""


@pytest.mark.parametrize("script, preset, expected", [
    ("train.py", {}, "3000"), ("train.py", {"GOMP_SPINCOUNT": "7"}, "7"),
    ("train.py", {"OMP_WAIT_POLICY": "PASSIVE"}, "unset"), ("analyze.py", {}, "3000")])
def test_openmp_spin_is_set_before_torch_loads_and_a_user_value_wins(script, preset, expected):
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    env.update(PYTHONPATH=str(ROOT), **preset)
    result = subprocess.run([sys.executable, "-c", SPIN_PROBE, str(ROOT / script)], capture_output=True,
                            text=True, timeout=120, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == expected
