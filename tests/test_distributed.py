"""Masked models train under DDP and FSDP2 (``fully_shard``) exactly as in one process.

One ``python -m torch.distributed.run --standalone --nproc_per_node=2`` launch (gloo, CPU)
runs ``dist_train_worker.py``: a tiny timm ViT masked with ``attnmask.apply`` before wrapping
trains 3 SGD steps under DDP, then under FSDP2, each rank on its half of every global batch.
Inside the workers every rank checks its masked layers against a local float64 recomputation
and that all ranks hold the same spec and parameters; rank 0 saves each trained model with
``attnmask.save_pretrained``. Here the saved folders are reloaded and compared with the same
training run in one process over the full batches, and with an unmasked run (so a lost mask
fails the comparison). One launch for both wrappers: starting two interpreters that import
torch and timm costs more than the training.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("timm")
pytest.importorskip("safetensors")
import torch.distributed as dist  # noqa: E402

if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)
try:
    from torch.distributed.fsdp import fully_shard  # noqa: E402
except ImportError:  # torch < 2.6
    pytest.skip("torch.distributed.fsdp.fully_shard (FSDP2) needs torch >= 2.6", allow_module_level=True)

import attnmask  # noqa: E402
from dist_train_worker import HEADS, WINDOW, attention_outputs, build, probe, train  # noqa: E402

HERE = Path(__file__).parent
ROOT = HERE.parent
PHASES = ["ddp", "fsdp2"]
LAUNCH_TIMEOUT = 300
"""Seconds; the launch takes about 10 s on two idle cores."""
ATOL, RTOL = 1e-6, 1e-5
"""Distributed vs one-process parameters after 3 steps differ by float rounding (about 6e-8);
an unmasked run differs from the masked one by about 2.5e-4."""

_LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


def worker_errors(stderr: str) -> str:
    """The workers' own lines (``[rankN]: ...``) of the launcher's stderr, else its tail."""
    lines = [line for line in stderr.splitlines() if line.startswith("[rank")]
    return "\n".join(lines)[-6000:] if lines else stderr[-6000:]


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> Path:
    """Run the worker on 2 processes once; the folder it wrote (``ddp/``, ``fsdp2/``, probes)."""
    out = tmp_path_factory.mktemp("distributed")
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_ENV}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        str(HERE / "dist_train_worker.py"), str(out), *PHASES,
    ]  # fmt: skip
    # A session of its own, so that a hung launch is ended with its workers, not just the launcher.
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT, start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate()
        pytest.fail(f"the 2-process launch did not finish in {LAUNCH_TIMEOUT} s:\n{worker_errors(stderr)}")
    assert proc.returncode == 0, f"the workers failed (exit {proc.returncode}):\n{worker_errors(stderr)}"
    return out


@pytest.fixture(scope="module")
def one_process() -> dict[str, dict[str, torch.Tensor]]:
    """The same training in one process over the full batches: masked and unmasked."""
    runs = {}
    for masked in (True, False):
        model = build(masked=masked)
        train(model)
        runs["masked" if masked else "unmasked"] = model.state_dict()
    return runs


def test_apply_adds_nothing_to_sync() -> None:
    """Masks are no parameters and no buffers: DDP and FSDP2 see exactly the unpatched model."""
    plain, masked = build(masked=False), build(masked=True)
    assert attnmask.is_patched(masked)
    assert list(masked.state_dict()) == list(plain.state_dict())
    for (name, p), (plain_name, q) in zip(masked.named_parameters(), plain.named_parameters(), strict=True):
        assert name == plain_name and torch.equal(p, q)
    assert [n for n, _ in masked.named_buffers()] == [n for n, _ in plain.named_buffers()]
    for module in masked.modules():  # what apply attached is geometry, never a tensor
        assert not [k for k, v in vars(module).items() if k.startswith("_attnmask") and isinstance(v, torch.Tensor)]


def test_workers_checked_every_rank(launched: Path) -> None:
    """Both phases ran on 2 ranks, each rank checking its masked layers against a local float64
    recomputation and its spec and parameters against every other rank's (in the worker)."""
    assert json.loads((launched / "done.json").read_text()) == {"world": 2, "phases": PHASES}


@pytest.mark.parametrize("phase", PHASES)
def test_parameters_equal_one_process(launched: Path, one_process, phase: str) -> None:
    """After 3 steps on 2 ranks the parameters equal the one-process run's; an unmasked run's do not."""
    trained = attnmask.from_pretrained(launched / phase).state_dict()
    assert list(trained) == list(one_process["masked"])
    for name, expected in one_process["masked"].items():
        torch.testing.assert_close(trained[name], expected, atol=ATOL, rtol=RTOL, msg=lambda m: f"{phase}: {name}: {m}")
    unmasked = max((trained[n] - p).abs().max().item() for n, p in one_process["unmasked"].items())
    assert unmasked > 100 * ATOL, f"{phase}: the masked run's parameters equal the unmasked run's (max diff {unmasked:.2e})"


@pytest.mark.parametrize("phase", PHASES)
def test_checkpoint_from_rank0_reloads_masked(launched: Path, phase: str) -> None:
    """The folder rank 0 saved loads masked, with the spec applied, and gives the trained model's outputs."""
    model = attnmask.from_pretrained(launched / phase)
    spec = attnmask.get_spec(model)
    assert spec is not None and spec == attnmask.get_spec(build())
    assert spec.window == (WINDOW, WINDOW) and all(heads == tuple(range(HEADS)) for heads in spec.heads)
    model.eval()
    logits, layers = attention_outputs(model, probe())
    torch.testing.assert_close(logits, torch.load(launched / f"{phase}-probe.pt"), atol=1e-6, rtol=1e-5)
    _, unmasked = attention_outputs(attnmask.remove(model), probe())
    moved = (unmasked[0] - layers[0]).abs().max().item()
    assert moved > 1e-3, f"{phase}: the reloaded masks do not change the first attention layer (max diff {moved:.2e})"


@pytest.fixture
def one_rank_mesh():
    """A process group of this process alone (gloo) and its 1-device CPU mesh, for FSDP2 in-process."""
    from torch.distributed.device_mesh import init_device_mesh

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


@pytest.mark.filterwarnings("ignore:FSDP2-wrapped module.*returned a view tensor")  # timm's own Attention too
def test_remove_and_reapply_where_fully_shard_wraps_attention(one_rank_mesh) -> None:
    """``fully_shard`` on a masked attention module swaps its class to ``FSDP<MaskedAttention>``:
    ``remove`` must still give the host's attention back (still sharded), and ``apply`` mask it again."""
    from torch.distributed.fsdp import FSDPModule

    from attnmask.adapters.timm_vit import MaskedAttention

    plain_logits, _ = attention_outputs(build(masked=False), probe())
    model = build()
    masked_logits, _ = attention_outputs(model, probe())
    for block in model.blocks:
        fully_shard(block.attn, mesh=one_rank_mesh)
        fully_shard(block, mesh=one_rank_mesh)
    fully_shard(model, mesh=one_rank_mesh)
    torch.testing.assert_close(attention_outputs(model, probe())[0], masked_logits, atol=1e-6, rtol=1e-5)

    attnmask.remove(model)
    assert not attnmask.is_patched(model)
    for block in model.blocks:
        assert isinstance(block.attn, FSDPModule), "remove dropped fully_shard's wrapper class"
        assert not isinstance(block.attn, MaskedAttention), f"remove left {type(block.attn).__name__} in place"
    torch.testing.assert_close(attention_outputs(model, probe())[0], plain_logits, atol=1e-6, rtol=1e-5)

    attnmask.apply(model, heads=HEADS, window=WINDOW)
    assert all(isinstance(block.attn, FSDPModule) for block in model.blocks)
    torch.testing.assert_close(attention_outputs(model, probe())[0], masked_logits, atol=1e-6, rtol=1e-5)
    train(model)  # and it still trains (gradients reach the sharded parameters)
