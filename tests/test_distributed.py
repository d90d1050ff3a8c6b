"""Two processes (gloo, CPU) give the same loss and gradients as one process on the whole batch:
cross-device negatives via gather_with_grad, the world-size scaling and gradient averaging."""
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from lco_mini import backbone, lora, losses, stages  # noqa: E402
from lco_mini.support import distributed  # noqa: E402
from lco_mini.tiny import model as tiny, tasks  # noqa: E402

BATCH = 8


def loss_and_grads(folder, triples):
    model, processor = backbone.load(folder, device="cpu")
    torch.manual_seed(1 + (dist.get_rank() if dist.is_initialized() else 0))  # ranks draw different A
    lora.add_lora(model, r=4, lora_alpha=8, lora_dropout=0.0)
    for _, layer in lora.lora_layers(model):
        torch.nn.init.normal_(layer.lora_B.weight, std=0.02)  # non-zero B: gradients reach A too
    params = [p for p in model.parameters() if p.requires_grad]
    distributed.broadcast_from_main(params)  # what train.py does: every rank gets rank 0's weights
    items = losses.batch_items(triples, hard_negatives=True)
    loss = losses.batch_loss(losses.embed_items(model, processor, items, torch.device("cpu")), len(triples),
                             temperature=0.03)
    loss.backward()
    loss = loss.detach() / distributed.world_size()  # as run_contrastive logs it
    distributed.average_gradients(params)
    return loss, [p.grad for p in params]


def worker(rank, world_size, folder, results, init_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    triples = tasks.world_pair_examples(BATCH, seed=1, multimodal_ratio=0.0)
    loss, grads = loss_and_grads(folder, stages.local_slice(triples))
    torch.save({"loss": loss, "grads": grads}, Path(results) / f"{rank}.pt")
    dist.destroy_process_group()


def test_two_processes_equal_one(tmp_path):
    folder = tiny.build_tiny(tmp_path / "m", seed=0, **tiny.SIZES["smoke"])
    mp.spawn(worker, args=(2, str(folder), str(tmp_path), str(tmp_path / "pg")), nprocs=2, join=True)
    single_loss, single_grads = loss_and_grads(folder, tasks.world_pair_examples(BATCH, seed=1, multimodal_ratio=0.0))
    for rank in range(2):
        got = torch.load(tmp_path / f"{rank}.pt")
        torch.testing.assert_close(got["loss"], single_loss, atol=1e-5, rtol=0)
        for g, ref in zip(got["grads"], single_grads):
            torch.testing.assert_close(g, ref, atol=1e-6, rtol=1e-4)


def unused_weight_worker(rank, world_size, results, init_file):
    """Rank 1's batch never reaches the second weight (as a share with no audio never reaches the
    audio tower): average_gradients must still join every collective, with zeros for it. No batch
    reaches the third."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    used, sometimes, never = (torch.nn.Parameter(torch.ones(n)) for n in (3, 2, 4))
    loss = (used * (rank + 1)).sum() + ((sometimes * 4).sum() if rank == 0 else 0)
    loss.backward()
    assert (sometimes.grad is None) == (rank == 1) and never.grad is None
    distributed.average_gradients([used, sometimes, never])
    torch.save({"used": used.grad, "sometimes": sometimes.grad, "never": never.grad}, Path(results) / f"unused{rank}.pt")
    dist.destroy_process_group()


def test_a_weight_one_process_did_not_reach_is_averaged_with_zeros(tmp_path):
    mp.spawn(unused_weight_worker, args=(2, str(tmp_path), str(tmp_path / "pg")), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(tmp_path / f"unused{rank}.pt")
        assert torch.equal(got["used"], torch.full((3,), 1.5))  # (1 + 2) / 2
        assert torch.equal(got["sometimes"], torch.full((2,), 2.0))  # (4 + 0) / 2
        assert got["never"] is None  # no process reached it: AdamW must skip it, as in one process
