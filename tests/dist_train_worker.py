"""Worker of ``test_distributed.py``: a masked tiny ViT trained under DDP, then under FSDP2.

Launched by ``python -m torch.distributed.run --standalone --nproc_per_node=2
tests/dist_train_worker.py OUT`` (gloo, CPU). One launch runs both phases, because starting
two interpreters that import torch and timm costs more than the training itself. Each rank
trains on its half of every global batch; rank 0 saves the trained model with
``attnmask.save_pretrained`` (``OUT/<phase>``) and the model's logits on a fixed probe batch
(``OUT/<phase>-probe.pt``) for the test to compare with a single-process run and with the
reloaded folder. The per-rank checks (every rank's masked layers equal a local float64
recomputation, every rank holds the same spec and parameters) fail the worker with an
``AssertionError``, which the test shows with the workers' stderr.

The test imports :func:`build`, :func:`batches`, :func:`probe` and :func:`train` to run
the same training in one process.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import timm
import torch
import torch.nn.functional as F
from torch import nn

import attnmask

MODEL_ARGS = dict(img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=4, num_classes=10)
"""A 4 x 4 patch grid plus a class token; a 3 x 3 window masks most of each masked head's keys."""
HEADS, WINDOW = 2, 3
STEPS, GLOBAL_BATCH, LR = 3, 8, 0.05


def build(masked: bool = True, backend: str = "auto") -> nn.Module:
    """The tiny ViT, with the same random initial weights in every process (seed 0)."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **MODEL_ARGS)
    if masked:
        attnmask.apply(model, heads=HEADS, window=WINDOW, backend=backend)
    return model


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``STEPS`` fixed global batches of images and labels."""
    generator = torch.Generator().manual_seed(1)
    return [
        (torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=generator), torch.randint(0, 10, (GLOBAL_BATCH,), generator=generator))
        for _ in range(STEPS)
    ]


def probe() -> torch.Tensor:
    """A fixed batch to compare outputs on."""
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))


def train(model: nn.Module, rank: int = 0, world: int = 1) -> None:
    """SGD with momentum on ``rank``'s share of each global batch (all of it when ``world == 1``).

    The loss is the mean over the rank's share; DDP and FSDP2 average gradients over ranks,
    so with equal shares each step sees the gradient of the global batch's mean loss. SGD, not
    AdamW: the key bias's true gradient is 0 (softmax ignores a constant per query), and Adam
    would scale the float rounding noise there up to a full ``lr`` step, hiding a real
    difference behind a loose tolerance.
    """
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    share = GLOBAL_BATCH // world
    model.train()
    for images, labels in batches():
        part = slice(rank * share, (rank + 1) * share)
        loss = F.cross_entropy(model(images[part]), labels[part])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def attention_outputs(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``model``'s logits and each attention module's output on ``images`` (forward hooks;
    ``model`` may be a DDP wrapper)."""
    outputs: list[torch.Tensor] = []
    inner = getattr(model, "module", model)
    handles = [block.attn.register_forward_hook(lambda m, a, out: outputs.append(out.detach())) for block in inner.blocks]
    try:
        with torch.no_grad():
            logits = model(images)
    finally:
        for handle in handles:
            handle.remove()
    return logits, outputs


def check_rank(model: nn.Module, trained: dict[str, torch.Tensor], images: torch.Tensor, phase: str) -> torch.Tensor:
    """Check what this rank computes against a local recomputation; return its logits on ``images``.

    ``model`` is the wrapped, trained model and ``trained`` its full (unsharded) state dict.
    A fresh model loaded with ``trained`` and masked with the float64 reference kernel must give
    the same masked-layer outputs: the masks each rank uses come from the geometry alone.
    """
    logits, layers = attention_outputs(model, images)
    local = build(masked=False)
    local.load_state_dict(trained)
    attnmask.apply(local, heads=HEADS, window=WINDOW, backend="reference")
    local.eval()
    expected_logits, expected_layers = attention_outputs(local, images)
    for i, (got, want) in enumerate(zip(layers, expected_layers)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=lambda m: f"{phase}: attention layer {i}: {m}")
    torch.testing.assert_close(logits, expected_logits, atol=1e-5, rtol=1e-5, msg=lambda m: f"{phase}: logits: {m}")
    return logits


def check_ranks_agree(spec: Optional[attnmask.MaskSpec], trained: dict[str, torch.Tensor], phase: str) -> None:
    """Every rank holds the same spec (computed locally, never sent) and the same parameters."""
    import torch.distributed as dist

    assert spec is not None, f"{phase}: the wrapped model lost its attnmask spec"
    digest = {name: float(t.double().sum()) for name, t in trained.items()}
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (spec.to_dict(), digest))
    for rank, (other_spec, other_digest) in enumerate(gathered):
        assert other_spec == spec.to_dict(), f"{phase}: rank {rank} has spec {other_spec}, rank {dist.get_rank()} {spec.to_dict()}"
        assert other_digest == digest, f"{phase}: rank {rank}'s parameters differ from rank {dist.get_rank()}'s"


def run_ddp(out: Path, rank: int, world: int) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = build()
    ddp = DDP(model)  # masks were applied before wrapping: DDP sees the unchanged parameters
    train(ddp, rank, world)
    trained = {name: t.detach().clone() for name, t in ddp.module.state_dict().items()}
    check_ranks_agree(attnmask.get_spec(ddp), trained, "ddp")  # seen through the wrapper
    logits = check_rank(ddp, trained, probe(), "ddp")
    if rank == 0:
        attnmask.save_pretrained(ddp.module, out / "ddp", model_args=MODEL_ARGS)
        torch.save(logits, out / "ddp-probe.pt")
    dist.barrier()


def run_fsdp2(out: Path, rank: int, world: int) -> None:
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    model = build()
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    train(model, rank, world)
    # Every rank gathers the full weights for its local check; rank 0 alone keeps them for saving.
    trained = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    check_ranks_agree(attnmask.get_spec(model), trained, "fsdp2")
    logits = check_rank(model, trained, probe(), "fsdp2")
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        unsharded = build()
        unsharded.load_state_dict(full)
        attnmask.save_pretrained(unsharded, out / "fsdp2", model_args=MODEL_ARGS)
        torch.save(logits, out / "fsdp2-probe.pt")
    else:
        assert not full, "get_model_state_dict(cpu_offload=True) gives the full weights to rank 0 only"
    dist.barrier()


def main(argv: list[str]) -> int:
    import torch.distributed as dist

    torch.set_num_threads(1)
    out = Path(argv[0])
    phases = argv[1:] or ["ddp", "fsdp2"]
    dist.init_process_group("gloo")
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        for phase in phases:
            {"ddp": run_ddp, "fsdp2": run_fsdp2}[phase](out, rank, world)
        if rank == 0:
            (out / "done.json").write_text(json.dumps({"world": world, "phases": phases}))
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
