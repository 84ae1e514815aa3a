"""Train or fine-tune a vision transformer with locality-masked attention heads.

In the style of timm's ``train.py``, short: a timm model name (built with random weights
unless ``--pretrained``), a Hugging Face image-classification checkpoint folder or an
attnmask Hub folder; ``attnmask.apply`` with ``--mask-heads``/``--window``/``--mode``; an
ImageFolder dataset; AdamW with a linear warm-up and a cosine decay per step; bf16 autocast;
``--compile``; DDP when launched by ``torchrun``. After every epoch the model is written to
``OUTPUT/last/`` as an attnmask Hub folder (``attnmask.from_pretrained(OUTPUT/last)`` gives
it back masked), with the optimizer, scheduler and epoch next to it for ``--resume``. The
final top-1 on ``--val-dir`` goes to ``OUTPUT/metrics.json``. Run from the repository root::

    python examples/train.py vit_small_patch16_224 --train-dir data/train --val-dir data/val \\
        --mask-heads mait --window 3 --epochs 30 --output runs/vit-s-mait
    torchrun --nproc_per_node 4 examples/train.py vit_small_patch16_224 --train-dir data/train ...
    python examples/train.py --resume runs/vit-s-mait/last --train-dir data/train --val-dir data/val \\
        --epochs 30 --output runs/vit-s-mait

Resuming continues exactly where the checkpoint left off: every epoch draws its batches,
augmentations and dropout from ``(--seed, epoch, rank)`` alone, so an interrupted run that is
resumed (with the same arguments) ends with the weights of an uninterrupted one.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Optional, Sequence, TextIO

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import attnmask
from attnmask.schedules import PRESETS
from attnmask.spec import HEAD_STRINGS, MODES, normalize_window

STATE_TENSORS = "train_state.safetensors"
STATE_JSON = "train_state.json"
SCHEDULE_ARGS = ("epochs", "batch_size", "lr", "min_lr", "weight_decay", "warmup_epochs", "warmup_steps", "seed")
"""Arguments that define the run: a resumed run that changes them does not continue the same run."""


# ----------------------------------------------------------------------------- arguments


def parse_heads(text: str) -> Any:
    """``--mask-heads``: an int count, a float fraction, ``all``/``none``, a schedule name or ``0,2`` indices."""
    if text in HEAD_STRINGS or text in PRESETS:
        return text
    try:
        if "," in text:
            return [int(part) for part in text.split(",") if part.strip()]
        return float(text) if "." in text else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not accepted: expected a head count (3), a fraction (0.5), 'all', 'none', head indices "
            f"(0,2) or a schedule ({', '.join(PRESETS)})"
        ) from None


def parse_window(text: str) -> tuple[int, int]:
    """``--window``: ``7`` or ``3x5`` (rows x columns), odd sizes."""
    try:
        sizes = [int(part) for part in text.lower().split("x")]
        return normalize_window(sizes[0] if len(sizes) == 1 else sizes)
    except (ValueError, TypeError, IndexError):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not accepted: expected an odd size (7) or odd rows x columns (3x5), centred on the query"
        ) from None


def parse_kwargs(text: str) -> tuple[str, Any]:
    """One ``--model-kwargs`` item, ``key=value`` (the value as a Python literal, else a string)."""
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"{text!r} is not accepted: expected key=value, e.g. img_size=32")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train.py", description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    model = parser.add_argument_group("model and masks")
    model.add_argument(
        "model", nargs="?", help="timm model name, Hugging Face checkpoint folder or attnmask Hub folder "
        "(ignored with --resume: the checkpoint is the model)",
    )  # fmt: skip
    model.add_argument("--model-kwargs", nargs="*", type=parse_kwargs, default=[], metavar="KEY=VALUE",
                       help="timm.create_model keyword arguments, e.g. img_size=32 patch_size=8 depth=2")
    model.add_argument("--pretrained", action="store_true", help="timm names: load timm's pretrained weights")
    model.add_argument("--mask-heads", type=parse_heads, default=None,
                       help="masked heads: count, fraction, all, none, indices 0,2 or a schedule "
                       f"({', '.join(PRESETS)}); default: a folder's saved masks, else 0.5")
    model.add_argument("--window", type=parse_window, default=None, help="window, 7 or 3x5 (default: saved, else 7)")
    model.add_argument("--mode", choices=MODES, default=None, help="mask mode (default: saved, else hard)")
    data = parser.add_argument_group("data")
    data.add_argument("--train-dir", type=Path, required=True, help="ImageFolder of training images")
    data.add_argument("--val-dir", type=Path, default=None, help="ImageFolder of validation images (final top-1)")
    data.add_argument("--img-size", type=int, default=None, help="input size (default: the model's)")
    data.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="data loader processes")
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=int, default=10, help="epochs the schedule spans")
    optim.add_argument("--stop-after", type=int, default=None, metavar="N",
                       help="stop after N epochs of this run (the schedule spans --epochs); continue with --resume")
    optim.add_argument("--batch-size", type=int, default=64, help="images per step and process")
    optim.add_argument("--lr", type=float, default=5e-4, help="peak learning rate")
    optim.add_argument("--min-lr", type=float, default=0.0, help="learning rate at the end of the cosine")
    optim.add_argument("--weight-decay", type=float, default=0.05, help="AdamW's (not on biases, norms, tokens)")
    optim.add_argument("--warmup-epochs", type=float, default=1.0, help="linear warm-up, in epochs")
    optim.add_argument("--warmup-steps", type=int, default=None, help="warm-up in steps (replaces --warmup-epochs)")
    optim.add_argument("--label-smoothing", type=float, default=0.1)
    optim.add_argument("--clip-grad", type=float, default=None, help="clip the gradient norm to this value")
    run = parser.add_argument_group("run")
    run.add_argument("--amp", choices=("auto", "none", "bf16", "fp16"), default="auto",
                     help="autocast dtype; auto: bf16 on CUDA, none on CPU")
    run.add_argument("--compile", action="store_true", help="torch.compile the model (after attnmask.apply)")
    run.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    run.add_argument("--output", type=Path, default=None, help="checkpoints and metrics (default: runs/train, "
                     "or the folder above --resume)")
    run.add_argument("--resume", type=Path, default=None, metavar="DIR", help="continue from OUTPUT/last")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--log-every", type=int, default=20, help="steps between progress lines off a terminal")
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject what argparse cannot see alone (exit 2, one line)."""
    if args.model is None and args.resume is None:
        parser.error("a model (timm name or folder) or --resume DIR is required")
    if args.resume is not None:
        if not (args.resume / STATE_JSON).is_file():
            parser.error(f"--resume {args.resume}: not a checkpoint folder (no {STATE_JSON})")
        given = [f"--{n.replace('_', '-')}" for n in ("mask_heads", "window", "mode") if getattr(args, n) is not None]
        if given:
            parser.error(f"{', '.join(given)} not accepted with --resume: the checkpoint's masks are resumed")
    for name in ("train_dir", "val_dir"):
        folder = getattr(args, name)
        if folder is not None and not folder.is_dir():
            parser.error(f"--{name.replace('_', '-')} {folder}: no such folder")
    if args.lr <= 0:
        parser.error(f"--lr {args.lr}: must be positive")
    for name in ("epochs", "batch_size", "log_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")
    if args.stop_after is not None and args.stop_after < 1:
        parser.error(f"--stop-after {args.stop_after}: must be at least 1")
    if args.workers < 0:
        parser.error(f"--workers {args.workers}: must be 0 or more")


# ----------------------------------------------------------------------------- distributed


class Dist:
    """This process's place in a ``torchrun`` launch (one process, rank 0, without one)."""

    def __init__(self, device: Optional[str]) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device is None:
            device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.world > 1:
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, *values: float) -> list[float]:
        """Sum over processes."""
        if self.world == 1:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def close(self) -> None:
        if self.world > 1:
            dist.destroy_process_group()


def seed_epoch(seed: int, epoch: int, rank: int) -> int:
    """Seed every generator from ``(seed, epoch, rank)`` alone; returns the data loader's seed.

    Batches, augmentations (in loader workers too) and dropout then depend on nothing that
    happened before the epoch, so resuming at an epoch boundary needs no saved RNG state.
    """
    value = int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])
    torch.manual_seed(value)
    np.random.seed(value)
    import random

    random.seed(value)
    return value


# ----------------------------------------------------------------------------- model


def is_timm_folder(folder: Path) -> bool:
    """timm's Hub layout names an ``architecture``; transformers' ``config.json`` a ``model_type``."""
    return "architecture" in json.loads((folder / "config.json").read_text())


def build_model(args: argparse.Namespace, classes: list[str]) -> tuple[nn.Module, Optional[dict[str, Any]]]:
    """The model with a ``len(classes)``-way head, unmasked or masked as its folder saved it.

    Returns:
        The model and, for a timm name, the ``create_model`` arguments that rebuild it.
    """
    labels = dict(
        num_labels=len(classes), id2label=dict(enumerate(classes)), label2id={c: i for i, c in enumerate(classes)}
    )
    if args.resume is not None:
        folder = args.resume
        return attnmask.from_pretrained(folder, **({} if is_timm_folder(folder) else {"use_safetensors": True})), None
    source = Path(args.model)
    if source.is_dir():
        if not (source / "config.json").is_file():
            raise ValueError(f"model={args.model!r} is not accepted: the folder has no config.json")
        if is_timm_folder(source):
            return attnmask.from_pretrained(source, num_classes=len(classes), **dict(args.model_kwargs)), None
        from transformers import AutoModelForImageClassification

        # After `import attnmask`, transformers applies a Hub folder's saved masks itself.
        model = AutoModelForImageClassification.from_pretrained(
            source, use_safetensors=True, ignore_mismatched_sizes=True, **labels
        )
        return model, None
    import timm

    if not timm.is_model(args.model):
        raise ValueError(f"model={args.model!r} is not accepted: no such folder, nor a timm model (timm.list_models())")
    model_args = {**dict(args.model_kwargs), "num_classes": len(classes)}
    return timm.create_model(args.model, pretrained=args.pretrained, **model_args), model_args


def mask(model: nn.Module, args: argparse.Namespace) -> nn.Module:
    """Apply the masks asked for on top of those the model came with (apply's defaults if none)."""
    spec = attnmask.get_spec(model)
    if spec is None:
        arguments: dict[str, Any] = dict(heads=0.5, window=7, mode="hard")
    else:
        arguments = dict(heads=spec.heads_mapping(), window=spec.window, mode=spec.mode, prefix=spec.prefix)
    given = dict(heads=args.mask_heads, window=args.window, mode=args.mode)
    if spec is not None and all(value is None for value in given.values()):
        return model
    arguments.update({key: value for key, value in given.items() if value is not None})
    return attnmask.apply(model, **arguments)


def data_config(model: nn.Module, args: argparse.Namespace) -> dict[str, Any]:
    """Input size, mean and std: the model's own (timm's pretrained_cfg, an HF processor file)."""
    size, mean, std = None, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    if getattr(model, "pretrained_cfg", None):
        from timm.data import resolve_model_data_config

        cfg = resolve_model_data_config(model)
        # A model built with img_size=... keeps its default pretrained_cfg size; the patch embedding knows.
        size = getattr(getattr(model, "patch_embed", None), "img_size", None) or cfg["input_size"]
        mean, std = cfg["mean"], cfg["std"]
    elif getattr(model, "config", None) is not None:
        size = getattr(model.config, "image_size", None)
        processor = Path(args.resume or args.model) / "preprocessor_config.json"
        if processor.is_file():
            read = json.loads(processor.read_text())
            mean, std = read.get("image_mean", mean), read.get("image_std", std)
    size = args.img_size or size
    if isinstance(size, (list, tuple)):
        size = size[-1]
    if not size:
        raise ValueError("the model does not say its input size: pass --img-size")
    return {"img_size": int(size), "mean": [float(m) for m in mean], "std": [float(s) for s in std]}


def processor_files(args: argparse.Namespace) -> list[Path]:
    """A transformers source folder's image processor file, carried into every checkpoint."""
    source = args.resume or (Path(args.model) if args.model else None)
    found = source / "preprocessor_config.json" if source is not None else None
    return [found] if found is not None and found.is_file() else []


def logits_of(output: Any) -> torch.Tensor:
    """timm returns logits; transformers an output object holding them."""
    return output if isinstance(output, torch.Tensor) else output.logits


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases, norms and tokens (timm's rule)."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (no_decay if parameter.ndim <= 1 or name in skip else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def cosine(total: int, warmup: int, min_ratio: float):
    """Learning-rate factor per step: linear warm-up, then a cosine down to ``min_ratio``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


# ----------------------------------------------------------------------------- data


def loaders(args: argparse.Namespace, data: dict[str, Any], where: Dist):
    """Training loader (sharded, reshuffled per epoch) and the validation dataset."""
    from torch.utils.data import DataLoader, DistributedSampler
    from torchvision import datasets, transforms

    size, normalize = data["img_size"], transforms.Normalize(data["mean"], data["std"])
    bicubic = transforms.InterpolationMode.BICUBIC
    train_tf = transforms.Compose([
        transforms.RandomResizedCrop(size, scale=(0.35, 1.0), interpolation=bicubic),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        normalize,
    ])  # fmt: skip
    val_tf = transforms.Compose([transforms.Resize(size, interpolation=bicubic), transforms.CenterCrop(size),
                                 transforms.ToTensor(), normalize])  # fmt: skip
    train = datasets.ImageFolder(str(args.train_dir), transform=train_tf)
    val = datasets.ImageFolder(str(args.val_dir), transform=val_tf) if args.val_dir else None
    if val is not None and val.classes != train.classes:
        raise ValueError(f"--val-dir {args.val_dir} has classes {val.classes}, --train-dir has {train.classes}")
    # A sampler per rank even in one process: the same shuffles (seed + epoch) either way.
    sampler = DistributedSampler(train, num_replicas=where.world, rank=where.rank, shuffle=True, seed=args.seed)
    loader = DataLoader(
        train, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers, drop_last=False,
        pin_memory=where.device.type == "cuda", generator=torch.Generator(),
    )  # fmt: skip
    return train.classes, loader, val


# ----------------------------------------------------------------------------- progress


class Progress:
    """One line on stderr: step, loss, images/s, ETA; in place on a terminal, every ``every`` steps otherwise."""

    def __init__(
        self, label: str, total: int, every: int, stream: Optional[TextIO] = None, enabled: bool = True
    ) -> None:
        self.label, self.total, self.every, self.enabled = label, total, every, enabled
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.start = self.last_print = time.perf_counter()
        self.images = 0
        self.rate = 0.0

    def update(self, step: int, loss: torch.Tensor, images: int) -> None:
        """After step ``step`` (1-based) of ``images`` images (all processes) whose loss is ``loss``
        (read, which waits for the device, only when a line is printed)."""
        self.images += images
        now = time.perf_counter()
        elapsed = now - self.start
        self.rate = self.images / max(elapsed, 1e-9)
        due = step == self.total or (now - self.last_print >= 0.2 if self.tty else step % self.every == 0)
        if not (self.enabled and due):
            return
        self.last_print = now
        eta = elapsed / step * (self.total - step)
        width = 20
        bar = "#" * (width * step // self.total)
        line = (
            f"{self.label} [{bar:<{width}}] {step}/{self.total} loss {float(loss.detach()):.4f} "
            f"{self.rate:.1f} img/s ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}"
        )
        self.stream.write(("\r" + line + ("\n" if step == self.total else "")) if self.tty else line + "\n")
        self.stream.flush()


# ----------------------------------------------------------------------------- checkpoints


def flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer ``state_dict`` as safetensors tensors (``state.<param>.<key>``) plus JSON for the rest."""
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, Any] = {"param_groups": state["param_groups"], "state": {}}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                plain["state"].setdefault(str(index), {})[key] = value
    return tensors, plain


def unflatten_optimizer(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`flatten_optimizer`."""
    state: dict[int, dict[str, Any]] = {int(index): dict(values) for index, values in plain["state"].items()}
    for name, tensor in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = tensor
    return {"state": state, "param_groups": plain["param_groups"]}


def save_checkpoint(folder: Path, model: nn.Module, model_args: Optional[dict[str, Any]], state: dict[str, Any],
                    optimizer: torch.optim.Optimizer, extra: Sequence[Path] = ()) -> None:  # fmt: skip
    """``folder`` as an attnmask Hub folder plus the training state (and ``extra`` files), replaced
    whole (never half written)."""
    import safetensors.torch

    tensors, plain = flatten_optimizer(optimizer.state_dict())
    with tempfile.TemporaryDirectory() as scratch:
        files = [Path(scratch) / STATE_TENSORS, Path(scratch) / STATE_JSON]
        safetensors.torch.save_file(tensors, str(files[0]))
        files[1].write_text(json.dumps({**state, "optimizer": plain}, indent=1) + "\n")
        # save_pretrained unwraps torch.compile and DDP and writes next to `folder`, then renames.
        attnmask.save_pretrained(model, folder, overwrite=True, model_args=model_args, include=[*files, *extra])


def load_state(folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The training state of a checkpoint and its optimizer ``state_dict``."""
    import safetensors.torch

    state = json.loads((folder / STATE_JSON).read_text())
    tensors = safetensors.torch.load_file(str(folder / STATE_TENSORS))
    return state, unflatten_optimizer(tensors, state.pop("optimizer"))


# ----------------------------------------------------------------------------- train and evaluate


@torch.no_grad()
def evaluate(model: nn.Module, dataset, args: argparse.Namespace, where: Dist, autocast) -> tuple[int, int]:
    """Correct and total predictions over ``dataset``, shared out between processes without padding."""
    from torch.utils.data import DataLoader, Subset

    shard = Subset(dataset, range(where.rank, len(dataset), where.world))
    model.eval()
    correct = total = 0
    for images, targets in DataLoader(shard, batch_size=args.batch_size, num_workers=args.workers):
        images, targets = images.to(where.device), targets.to(where.device)
        with autocast():
            predicted = logits_of(model(images)).argmax(dim=1)
        correct += int((predicted == targets).sum())
        total += len(targets)
    correct, total = where.sum(correct, total)
    return int(correct), int(total)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    where = Dist(args.device)
    try:
        return train(parser, args, where)
    finally:
        where.close()


def train(parser: argparse.ArgumentParser, args: argparse.Namespace, where: Dist) -> int:
    say = print if where.main else (lambda *a, **k: None)
    output = args.output or (args.resume.parent if args.resume else Path("runs/train"))
    resumed: dict[str, Any] = {}
    optimizer_state = None
    if args.resume:
        resumed, optimizer_state = load_state(args.resume)
        changed = [f"--{n.replace('_', '-')}" for n in SCHEDULE_ARGS if resumed["args"].get(n) != getattr(args, n)]
        if changed and where.main:
            print(f"warning: {', '.join(changed)} differ from the checkpoint's run: it will not continue exactly",
                  file=sys.stderr)  # fmt: skip

    torch.manual_seed(args.seed)
    from torchvision import datasets

    try:
        classes = datasets.ImageFolder(str(args.train_dir)).classes
    except FileNotFoundError as error:
        parser.error(f"--train-dir {args.train_dir} is not an ImageFolder (a folder per class): {error}"[:300])
    try:
        model, model_args = build_model(args, classes)
        model = mask(model, args)
    except (ValueError, TypeError) as error:  # bad masks for this model, unsupported model: exit 2, one line
        parser.error(" ".join(str(error).split()))
    if args.resume:
        model_args = resumed.get("model_args")
        if resumed.get("classes") != classes:
            parser.error(f"--train-dir classes {classes} differ from the checkpoint's {resumed.get('classes')}")
    try:
        # A resumed run reads its inputs as the checkpoint's run did (a source folder's processor file is not at hand).
        data = resumed["data"] if args.resume and not args.img_size else data_config(model, args)
        classes, loader, val = loaders(args, data, where)
    except (ValueError, FileNotFoundError) as error:
        parser.error(" ".join(str(error).split())[:300])
    spec = attnmask.get_spec(model)
    say(f"{type(model).__name__}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, "
        f"{sum(map(len, spec.heads))} of {sum(spec.num_heads)} heads masked, window {spec.window[0]}x{spec.window[1]}, "
        f"{spec.mode}; {len(loader.dataset)} training images, {len(classes)} classes, {where.world} process(es) "
        f"on {where.device}")  # fmt: skip

    raw = model.to(where.device)  # what is saved and evaluated: masked, neither DDP nor compiled
    optimizer = torch.optim.AdamW(param_groups(raw, args.weight_decay), lr=args.lr)
    steps = len(loader)
    total = steps * args.epochs
    warmup = args.warmup_steps if args.warmup_steps is not None else round(args.warmup_epochs * steps)
    schedule = cosine(total, min(warmup, total - 1), args.min_lr / args.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    amp = args.amp if args.amp != "auto" else ("bf16" if where.device.type == "cuda" else "none")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    scaler = torch.amp.GradScaler(where.device.type, enabled=amp == "fp16")

    def autocast():
        return torch.autocast(where.device.type, dtype=dtype) if dtype else nullcontext()

    start_epoch = 0
    if args.resume:
        optimizer.load_state_dict(optimizer_state)
        scheduler.load_state_dict(resumed["scheduler"])
        if resumed.get("scaler"):
            scaler.load_state_dict(resumed["scaler"])
        start_epoch = resumed["epoch"]
        say(f"resumed from {args.resume} after epoch {start_epoch}")

    model = raw
    if where.world > 1:
        # Masked before wrapping: DDP sees the patched modules; the masks are no parameters or buffers to sync.
        model = nn.parallel.DistributedDataParallel(raw)
    if args.compile:
        model = torch.compile(model)

    stop = args.epochs if args.stop_after is None else min(args.epochs, start_epoch + args.stop_after)
    rates, last_loss = [], None
    for epoch in range(start_epoch, stop):
        loader.generator.manual_seed(seed_epoch(args.seed, epoch, where.rank))
        loader.sampler.set_epoch(epoch)
        model.train()
        progress = Progress(f"epoch {epoch + 1}/{args.epochs}", steps, args.log_every, enabled=where.main)
        for step, (images, targets) in enumerate(loader, 1):
            images = images.to(where.device, non_blocking=True)
            targets = targets.to(where.device, non_blocking=True)
            with autocast():
                loss = F.cross_entropy(logits_of(model(images)), targets, label_smoothing=args.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if args.clip_grad is not None:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(raw.parameters(), args.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            progress.update(step, loss, len(images) * where.world)
        rates.append(progress.rate)
        last_loss = float(loss.detach())
        if where.main:
            state = {
                "epoch": epoch + 1,
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler.is_enabled() else {},
                "args": {n: getattr(args, n) for n in SCHEDULE_ARGS},
                "classes": classes,
                "model_args": model_args,
                "data": data,
            }
            save_checkpoint(output / "last", raw, model_args, state, optimizer, processor_files(args))

    metrics: dict[str, Any] = {
        "epochs_done": stop,
        "epochs": args.epochs,
        "train_images_per_s": sum(rates) / len(rates) if rates else None,
        "last_train_loss": last_loss,
        "spec": spec.to_dict(),
        "data": data,
        "amp": amp,
        "compile": args.compile,
        "world_size": where.world,
        "checkpoint": str(output / "last"),
    }
    if val is not None:
        correct, count = evaluate(raw, val, args, where, autocast)
        metrics.update(top1=correct / max(count, 1), val_images=count)
        say(f"top-1 {correct / max(count, 1):.4f} ({correct}/{count} validation images)")
    if where.main:
        output.mkdir(parents=True, exist_ok=True)
        (output / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
        say(f"checkpoint {output / 'last'}; metrics {output / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
