"""A small-scale replication of MaiT on a 2-core CPU: does locality masking help a small ViT
trained from scratch, and do its early layers turn out local on their own?

Data: scikit-learn's handwritten digits (1,797 grey 8 x 8 images, shipped inside the package:
nothing is downloaded), upsampled to 16 x 16 and split once, stratified, into 1,347 training
and 450 test images. Model: a timm ``VisionTransformer`` built from its config with random
weights (patch 2, so an 8 x 8 patch grid plus a class token; 6 layers of 4 heads). Three
conditions, trained with the same optimizer, schedule, augmentation, batch size and epochs,
from the same initial weights and with the same batches for a given seed:

- ``unmasked``: the plain ViT;
- ``mait``: ``attnmask.apply(model, heads="mait", window=3)``, the paper's schedule (every
  head masked in the first third of the layers, head 0 in the middle third, none in the last);
- ``random``: the control of the paper's ablation. The same heads are masked, but each patch
  query may attend to a random, fixed set of patches of the same size as its 3 x 3 window
  (clipped at the border exactly as the real window is: 4, 6 or 9 patches), so every row has
  the real mask's density while the locality is gone. The class token stays global both ways,
  as with the real mask. One random pattern per layer, shared by that layer's masked heads
  (the real mask is also one pattern per layer), drawn from the run's seed. attnmask has no
  random mask: it is implemented here as a forward pre-hook that hands timm's own
  ``Attention`` an additive ``attn_mask`` (see :class:`RandomPatchMask`).

Locality: the attention locality score (ALS, ``attnmask.locality_scores``: the mean over
patch queries of the attention on the patch keys inside the 3 x 3 window) of every head, for
the unmasked model before and after training, for both masked models, against uniform
attention. The paper measured ALS on a model whose head 0 carries a *soft* mask in every
layer (its head search); a ``probe`` run does that too (``heads=[0], mode="soft"``, same
recipe, the first ``probe_seeds`` seeds), and ``attnmask.suggest_heads`` turns its scores
into the schedule the paper's rule would choose.

Results go to a JSON file (per run accuracy and curves, mean +- std per condition, paired
differences, ALS tables, the configuration, the machine and how busy it was, versions, wall
time) and two figures. Run from the repository root in the README's environment
(``pip install -e ".[dev]"``)::

    python examples/replicate_small.py            # the documented run (about 11 min, 2 cores)
    python examples/replicate_small.py --quick    # a smoke test (seconds); writes to a temp folder

Every run is deterministic: the same seed gives the same numbers in any process.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import attnmask
from attnmask.masks import evaluate

ROOT = Path(__file__).resolve().parents[1]
CONDITIONS = ("unmasked", "mait", "random")
PROBE = "probe"

CONFIG: dict[str, Any] = {
    "image_size": 16,  # digits are 8 x 8; bilinear upsampling to 16 x 16
    "patch_size": 2,  # -> an 8 x 8 patch grid, 64 patch tokens + 1 class token
    "embed_dim": 64,
    "depth": 6,
    "num_heads": 4,
    "mlp_ratio": 2.0,
    "weight_init": "jax",  # timm's jax init leaves the early loss plateau sooner than the default
    "drop_path_rate": 0.0,
    "window": 3,
    "schedule": "mait",
    "probe": {"heads": [0], "mode": "soft"},
    "probe_seeds": 2,
    "epochs": 16,
    "batch_size": 32,
    "lr": 2e-3,
    "weight_decay": 0.05,
    "warmup_epochs": 2,
    "label_smoothing": 0.1,
    "grad_clip": 1.0,
    "augment": {"rotate_deg": 5.0, "scale": [0.95, 1.05], "translate_px": 1.0},
    "test_size": 450,
    "split_seed": 0,
    "als_images": 450,
}

QUICK: dict[str, Any] = {"epochs": 1, "train_subset": 128, "als_images": 32, "probe_seeds": 1}


# ----------------------------------------------------------------------------- data


def load_digits(config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """scikit-learn's digits, upsampled, scaled to [0, 1] and split once (stratified)."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
        from sklearn.model_selection import train_test_split
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise SystemExit(f"this example needs scikit-learn: pip install -e '.[examples]' ({error})")
    digits = sklearn_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    size = config["image_size"]
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    train, test = train_test_split(
        list(range(len(labels))),
        test_size=config["test_size"],
        stratify=labels.numpy(),
        random_state=config["split_seed"],
    )
    train, test = torch.tensor(train), torch.tensor(test)
    if config.get("train_subset"):
        train = train[: config["train_subset"]]
    return {
        "train_x": images[train],
        "train_y": labels[train],
        "test_x": images[test],
        "test_y": labels[test],
        "mean": images[train].mean(),
        "std": images[train].std(),
    }


def augment(images: torch.Tensor, config: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
    """Random rotation, scale and translation of a batch in [0, 1] (background 0)."""
    aug = config["augment"]
    n = images.shape[0]
    angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(aug["rotate_deg"])
    low, high = aug["scale"]
    scale = low + torch.rand(n, generator=generator) * (high - low)
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * (2 * aug["translate_px"] / config["image_size"])
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


# ----------------------------------------------------------------------------- model and masks


def build_model(config: dict[str, Any], seed: int) -> nn.Module:
    """A small timm VisionTransformer with random weights (the same for a given seed)."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    return VisionTransformer(
        img_size=config["image_size"],
        patch_size=config["patch_size"],
        in_chans=1,
        num_classes=10,
        embed_dim=config["embed_dim"],
        depth=config["depth"],
        num_heads=config["num_heads"],
        mlp_ratio=config["mlp_ratio"],
        drop_path_rate=config["drop_path_rate"],
        weight_init=config["weight_init"],
        class_token=True,
        global_pool="token",
    )


def window_mask(grid: tuple[int, int], window: int, prefix_tokens: int) -> torch.Tensor:
    """The real mask of one local head, ``(N, N)`` bool, evaluated from attnmask's definition."""
    tokens = prefix_tokens + grid[0] * grid[1]
    return evaluate(attnmask.local_window(grid, (window, window), prefix_tokens), 1, tokens)[0]


class RandomPatchMask:
    """Forward pre-hook giving a timm ``Attention`` a fixed random mask on some heads.

    Each patch query of a masked head may attend to ``|W(n)|`` patches drawn at random
    (without replacement) from the whole grid, where ``|W(n)|`` is the size of its real,
    border-clipped window; prefix tokens attend to everything and every query sees them.
    Unmasked heads see everything. The mask goes in as timm's own ``attn_mask`` argument
    (additive, 0 or -inf, shape ``(1, heads, N, N)``), so timm's attention code runs as is.

    Args:
        local: The real window mask ``(N, N)``; only its row counts are used.
        prefix_tokens: Number of prefix tokens before the patches.
        num_heads: Heads of the layer.
        heads: Indices of the masked heads.
        generator: Source of the random pattern.
    """

    def __init__(
        self,
        local: torch.Tensor,
        prefix_tokens: int,
        num_heads: int,
        heads: Sequence[int],
        generator: torch.Generator,
    ) -> None:
        tokens = local.shape[0]
        patches = tokens - prefix_tokens
        allowed = torch.ones(tokens, tokens, dtype=torch.bool)
        allowed[prefix_tokens:, prefix_tokens:] = False
        sizes = local[prefix_tokens:, prefix_tokens:].sum(dim=1)
        for row, size in enumerate(sizes.tolist()):
            chosen = torch.randperm(patches, generator=generator)[:size]
            allowed[prefix_tokens + row, prefix_tokens + chosen] = True
        assert torch.equal(allowed.sum(dim=1), local.sum(dim=1)), "the random mask keeps the real mask's density"
        self.allowed = allowed
        per_head = torch.ones(num_heads, tokens, tokens, dtype=torch.bool)
        per_head[list(heads)] = allowed
        self.bias = torch.zeros(1, num_heads, tokens, tokens).masked_fill(~per_head, float("-inf"))

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        x = args[0] if args else kwargs["x"]
        kwargs["attn_mask"] = self.bias.to(device=x.device, dtype=x.dtype)
        return args, kwargs


def schedule_heads(model: nn.Module, config: dict[str, Any]) -> tuple[tuple[int, ...], ...]:
    """The heads the paper's schedule masks in each layer, as ``attnmask.apply`` resolves them."""
    resolved = attnmask.apply(copy.deepcopy(model), heads=config["schedule"], window=config["window"])
    return attnmask.get_spec(resolved).heads


def prepare(model: nn.Module, condition: str, config: dict[str, Any], seed: int) -> dict[str, Any]:
    """Mask ``model`` in place for ``condition``; returns what was masked."""
    if condition == PROBE:
        attnmask.apply(model, heads=config["probe"]["heads"], window=config["window"], mode=config["probe"]["mode"])
        spec = attnmask.get_spec(model)
        return {"heads": [list(h) for h in spec.heads], "spec": spec.to_dict()}
    heads = schedule_heads(model, config)
    if condition == "unmasked":
        return {"heads": [[] for _ in heads]}
    if condition == "mait":
        attnmask.apply(model, heads=config["schedule"], window=config["window"])
        return {"heads": [list(h) for h in heads], "spec": attnmask.get_spec(model).to_dict()}
    grid = (int(model.patch_embed.grid_size[0]), int(model.patch_embed.grid_size[1]))
    prefix = int(model.num_prefix_tokens)
    local = window_mask(grid, config["window"], prefix)
    generator = torch.Generator().manual_seed(10_000 + seed)
    for block, layer_heads in zip(model.blocks, heads):
        if layer_heads:
            hook = RandomPatchMask(local, prefix, block.attn.num_heads, layer_heads, generator)
            block.attn.register_forward_pre_hook(hook, with_kwargs=True)
    return {"heads": [list(h) for h in heads], "random_pattern": "one per layer, shared by its masked heads"}


# ----------------------------------------------------------------------------- training


def accuracy(model: nn.Module, data: dict[str, torch.Tensor], batch: int = 256) -> float:
    """Test accuracy."""
    model.eval()
    images, labels = data["test_x"], data["test_y"]
    correct = 0
    with torch.no_grad():
        for start in range(0, len(labels), batch):
            logits = model((images[start : start + batch] - data["mean"]) / data["std"])
            correct += int((logits.argmax(dim=1) == labels[start : start + batch]).sum())
    return correct / len(labels)


def train(model: nn.Module, data: dict[str, torch.Tensor], config: dict[str, Any], seed: int) -> dict[str, Any]:
    """AdamW, linear warm-up then cosine decay per step; test accuracy after every epoch."""
    generator = torch.Generator().manual_seed(seed)  # batch order and augmentation: the same for every condition
    n = len(data["train_y"])
    steps_per_epoch = math.ceil(n / config["batch_size"])
    total = steps_per_epoch * config["epochs"]
    warmup = min(steps_per_epoch * config["warmup_epochs"], max(total - 1, 0))
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        (no_decay if parameter.ndim <= 1 or name in ("pos_embed", "cls_token") else decay).append(parameter)
    groups = [{"params": decay, "weight_decay": config["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=config["lr"])

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    curve, losses = [], []
    start = time.perf_counter()
    for _ in range(config["epochs"]):
        model.train()
        order = torch.randperm(n, generator=generator)
        running = 0.0
        for i in range(0, n, config["batch_size"]):
            index = order[i : i + config["batch_size"]]
            images = (augment(data["train_x"][index], config, generator) - data["mean"]) / data["std"]
            loss = F.cross_entropy(model(images), data["train_y"][index], label_smoothing=config["label_smoothing"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config["grad_clip"])
            optimizer.step()
            scheduler.step()
            running += float(loss.detach()) * len(index)
        losses.append(running / n)
        curve.append(accuracy(model, data))
    return {
        "test_accuracy": curve[-1],
        "test_accuracy_per_epoch": curve,
        "train_loss_per_epoch": losses,
        "train_seconds": time.perf_counter() - start,
    }


# ----------------------------------------------------------------------------- locality


def als(model: nn.Module, images: torch.Tensor, config: dict[str, Any]) -> list[list[float]]:
    """ALS of every head, ``[layer][head]`` (``attnmask.locality_scores``)."""
    model.eval()
    return attnmask.locality_scores(model, images, window=config["window"], progress=False).tolist()


def uniform_baseline(grid: tuple[int, int], window: int, prefix_tokens: int) -> dict[str, float]:
    """ALS of a head that attends uniformly: mean over patch queries of ``|W(n)| / N``.

    ``all_tokens`` spreads the attention over every key, prefix tokens included (what
    ``locality_scores`` compares with: attention on the class token counts as non-local);
    ``patches_only`` over the patch keys alone.
    """
    local = window_mask(grid, window, prefix_tokens)
    counts = local[prefix_tokens:, prefix_tokens:].sum(dim=1).double()
    patches = grid[0] * grid[1]
    return {
        "all_tokens": float((counts / (patches + prefix_tokens)).mean()),
        "patches_only": float((counts / patches).mean()),
    }


# ----------------------------------------------------------------------------- runs


def job(config: dict[str, Any], seed: int, condition: str) -> dict[str, Any]:
    """One training run: build the seed's model, mask it for ``condition``, train, score."""
    data = load_digits(config)
    als_images = ((data["test_x"] - data["mean"]) / data["std"])[: config["als_images"]]
    model = build_model(config, seed)
    out: dict[str, Any] = {"seed": seed, "condition": condition}
    if condition == "unmasked":
        out["als_init"] = als(model, als_images, config)
    out["masked"] = prepare(model, condition, config, seed)
    out["result"] = dict(train(model, data, config, seed), seed=seed)
    out["als_trained"] = als(model, als_images, config)
    out["data"] = {"train": len(data["train_y"]), "test": len(data["test_y"])}
    return out


def _job(args: tuple) -> dict[str, Any]:
    return job(*args)


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def run_jobs(jobs: list[tuple], workers: int, threads: int, echo: Callable[[str], None]) -> list[dict[str, Any]]:
    """Run ``jobs`` in order, in ``workers`` processes of ``threads`` threads (in this one for 1)."""

    def report(output: dict[str, Any]) -> dict[str, Any]:
        result = output["result"]
        echo(
            f"seed {output['seed']} {output['condition']:>8}: test accuracy {result['test_accuracy'] * 100:.2f}% "
            f"({result['train_seconds']:.0f} s)"
        )
        return output

    if workers <= 1:
        return [report(_job(item)) for item in jobs]
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(threads,)) as pool:
        return [report(output) for output in pool.imap(_job, jobs)]


def summary(values: Sequence[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
    }


def mean_table(tables: Sequence[list[list[float]]]) -> list[list[float]]:
    return torch.tensor(tables, dtype=torch.float64).mean(dim=0).tolist()


def heads_mean(table: list[list[float]], heads: Sequence[Sequence[int]], chosen: bool) -> list[Optional[float]]:
    """Per layer, the mean ALS of the listed heads (``chosen``) or of the others; ``None`` if none."""
    out: list[Optional[float]] = []
    for layer, row in enumerate(table):
        values = [v for h, v in enumerate(row) if (h in heads[layer]) == chosen]
        out.append(statistics.fmean(values) if values else None)
    return out


def collect(outputs: list[dict[str, Any]], config: dict[str, Any]) -> dict[str, Any]:
    """Accuracy summaries, paired differences and locality tables from the runs' outputs."""
    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in (*CONDITIONS, PROBE)}
    tables: dict[str, list] = {c: [] for c in (*CONDITIONS, PROBE)}
    initial, masked = [], {}
    for output in outputs:
        condition = output["condition"]
        runs[condition].append(output["result"])
        tables[condition].append(output["als_trained"])
        masked[condition] = output["masked"]
        if "als_init" in output:
            initial.append(output["als_init"])
    grid = (config["image_size"] // config["patch_size"],) * 2
    schedule = masked["mait"]["heads"]
    locality: dict[str, Any] = {
        "uniform": uniform_baseline(grid, config["window"], prefix_tokens=1),
        "unmasked_init": initial,
        "unmasked_init_mean": mean_table(initial),
    }
    for condition in CONDITIONS:
        locality[f"{condition}_trained"] = tables[condition]
        locality[f"{condition}_trained_mean"] = mean_table(tables[condition])
    unmasked = locality["unmasked_trained_mean"]
    locality["unmasked_trained_per_layer"] = [statistics.fmean(row) for row in unmasked]
    locality["unmasked_trained_per_layer_max"] = [max(row) for row in unmasked]
    locality["unmasked_init_per_layer"] = [statistics.fmean(row) for row in locality["unmasked_init_mean"]]
    locality["mait_trained_masked_heads_mean"] = heads_mean(locality["mait_trained_mean"], schedule, True)
    locality["mait_trained_global_heads_mean"] = heads_mean(locality["mait_trained_mean"], schedule, False)
    locality["random_trained_masked_heads_mean"] = heads_mean(locality["random_trained_mean"], schedule, True)

    summaries = {c: summary([r["test_accuracy"] for r in runs[c]]) for c in CONDITIONS}
    differences = {
        f"{a}_minus_{b}": summary([x["test_accuracy"] - y["test_accuracy"] for x, y in zip(runs[a], runs[b])])
        for a, b in (("mait", "unmasked"), ("random", "unmasked"), ("mait", "random"))
    }
    probe: dict[str, Any] = {}
    if runs[PROBE]:
        probe_mean = mean_table(tables[PROBE])
        probe_heads = masked[PROBE]["heads"]
        suggested = attnmask.suggest_heads(probe_mean)
        probe = {
            "what": (
                "the paper's head search: head 0 of every layer soft-masked (logits outside the window set to 0), "
                "trained with the same recipe; its ALS tells how local that head wants to be"
            ),
            "masked_heads": probe_heads,
            "runs": runs[PROBE],
            "summary": summary([r["test_accuracy"] for r in runs[PROBE]]),
            "als": tables[PROBE],
            "als_mean": probe_mean,
            "masked_head_per_layer": heads_mean(probe_mean, probe_heads, True),
            "global_heads_per_layer": heads_mean(probe_mean, probe_heads, False),
            "suggested_heads": {str(layer): heads for layer, heads in suggested.items()},
        }
    return {
        "masked_heads": {c: masked[c] for c in CONDITIONS},
        "summary": summaries,
        "paired_differences": differences,
        "runs": {c: runs[c] for c in CONDITIONS},
        "locality": locality,
        "probe": probe,
    }


# ----------------------------------------------------------------------------- the machine


def machine() -> dict[str, Any]:
    """What the run ran on."""
    cpu = platform.processor() or platform.machine()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in lscpu.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average_1_5_15_min": list(load) if load else None,
    }


class LoadSampler:
    """Samples the 1-minute load average every ``every`` seconds in a background thread: how
    busy the machine was during the run (this run's own processes count too)."""

    def __init__(self, every: float = 15.0) -> None:
        self.every = every
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while True:
            if hasattr(os, "getloadavg"):
                self.samples.append(os.getloadavg()[0])
            if self._stop.wait(self.every):
                return

    def __enter__(self) -> "LoadSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self, own: int) -> dict[str, Any]:
        if not self.samples:
            return {}
        mean = statistics.fmean(self.samples)
        return {
            "load_1min_mean": mean,
            "load_1min_max": max(self.samples),
            "samples": len(self.samples),
            "own_processes": own,
            "others_estimate": max(0.0, mean - own),
        }


# ----------------------------------------------------------------------------- figures

COLORS = {"unmasked": "tab:gray", "mait": "tab:blue", "random": "tab:orange", PROBE: "tab:red"}


def plot_accuracy(results: dict[str, Any], path: Path) -> None:
    """Final accuracy per condition (mean +- std, and each seed) and the mean test curves."""
    from matplotlib.figure import Figure

    labels = {"unmasked": "unmasked", "mait": "MaiT schedule\n(3x3 window)", "random": "random mask\n(same density)"}
    conditions = results["conditions"]
    fig = Figure(figsize=(10, 4), layout="constrained")
    bars, curves = fig.subplots(1, 2)
    for i, condition in enumerate(conditions):
        color = COLORS[condition]
        stats = results["summary"][condition]
        bars.errorbar(i, stats["mean"] * 100, yerr=stats["std"] * 100, fmt="o", color=color, capsize=8, ms=9)
        seeds = [r["test_accuracy"] * 100 for r in results["runs"][condition]]
        bars.scatter([i + 0.12] * len(seeds), seeds, color=color, alpha=0.5, s=18)
        per_epoch = torch.tensor([r["test_accuracy_per_epoch"] for r in results["runs"][condition]]) * 100
        epochs, mean = range(1, per_epoch.shape[1] + 1), per_epoch.mean(0)
        curves.plot(epochs, mean, ".-" if len(epochs) < 3 else "-", color=color, label=condition)
        if per_epoch.shape[0] > 1:
            spread = per_epoch.std(0)
            curves.fill_between(epochs, mean - spread, mean + spread, color=color, alpha=0.2)
    bars.set_xticks(range(len(conditions)), [labels[c] for c in conditions])
    bars.set_xlim(-0.5, len(conditions) - 0.5)
    bars.set_ylabel("test accuracy (%)")
    bars.set_title(f"final test accuracy: mean +- std of {len(results['seeds'])} seeds (dots: seeds)", fontsize=9)
    bars.grid(axis="y", alpha=0.3)
    lowest = min(results["summary"][c]["mean"] for c in conditions) * 100
    curves.set_ylim(max(0.0, lowest - 20), 100)
    curves.set_xlabel("epoch")
    curves.set_ylabel("test accuracy (%)")
    curves.set_title("test accuracy after each epoch (mean +- std over seeds)", fontsize=9)
    curves.legend()
    curves.grid(alpha=0.3)
    epochs = results["config"]["epochs"]
    fig.suptitle(f"ViT from scratch on scikit-learn's digits: {epochs} epochs per run, same recipe", fontsize=10)
    fig.savefig(path, dpi=120)


def plot_locality(results: dict[str, Any], path: Path) -> None:
    """ALS heatmap of the trained unmasked model and the per-layer profile of every model."""
    from matplotlib.figure import Figure

    import attnmask.plot

    locality, probe = results["locality"], results["probe"]
    fig = Figure(figsize=(12, 4.2), layout="constrained")
    heat, profile = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.5]})
    seeds = len(results["seeds"])
    title = f"ALS, trained unmasked model\n(mean of {seeds} seeds)"
    attnmask.plot.locality(locality["unmasked_trained_mean"], ax=heat, title=title)
    per_seed = torch.tensor(locality["unmasked_trained"]).mean(dim=2)  # (seeds, layers)
    layers = list(range(per_seed.shape[1]))
    spread = per_seed.std(0) if per_seed.shape[0] > 1 else torch.zeros(len(layers))

    def line(values: Sequence[Optional[float]], style: str, color: str, label: str, **kw) -> None:
        xs = [layer for layer, v in zip(layers, values) if v is not None]
        if xs:
            profile.plot(xs, [v for v in values if v is not None], style, color=color, label=label, **kw)

    profile.errorbar(
        layers, per_seed.mean(0), yerr=spread, fmt="o-", color=COLORS["unmasked"], capsize=4,
        label="unmasked, trained: mean of heads (+- std over seeds)",
    )  # fmt: skip
    line(locality["unmasked_trained_per_layer_max"], "^:", COLORS["unmasked"], "unmasked, trained: most local head")
    line(locality["unmasked_init_per_layer"], "s--", "tab:green", "unmasked, at initialisation")
    if probe:
        count = len(probe["runs"])
        label = f"probe: soft-masked head 0, the paper's search ({count} seed{'s' if count > 1 else ''})"
        line(probe["masked_head_per_layer"], "*-", COLORS[PROBE], label, ms=9)
    line(locality["mait_trained_masked_heads_mean"], "d-", COLORS["mait"], "MaiT model: masked heads (hard)", alpha=0.5)
    line(locality["mait_trained_global_heads_mean"], "d-.", COLORS["mait"], "MaiT model: global heads")
    line(locality["random_trained_masked_heads_mean"], "x-.", COLORS["random"], "random-mask model: masked heads")
    profile.axhline(locality["uniform"]["all_tokens"], color="black", lw=1, ls=":", label="uniform attention")
    profile.set_ylim(0, 1)
    profile.set_xticks(layers)
    profile.set_xlabel("layer")
    profile.set_ylabel("ALS (attention inside the 3x3 window)")
    profile.set_title("ALS per layer (mean over heads and seeds)", fontsize=9)
    profile.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    profile.grid(alpha=0.3)
    fig.savefig(path, dpi=120)


def draw(results: dict[str, Any], folder: Path) -> None:
    """Both figures into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    plot_accuracy(results, folder / "replicate_accuracy.png")
    plot_locality(results, folder / "replicate_als.png")


# ----------------------------------------------------------------------------- main


def run(config: dict[str, Any], seeds: Sequence[int], workers: int = 1, threads: int = 1, echo=print) -> dict[str, Any]:
    """Train every condition for every seed (and the probe for the first seeds), measure
    locality, and return the results.

    Runs are independent and deterministic (the same seed gives the same result in whichever
    process runs it); with ``workers > 1`` they run in that many processes of ``threads``
    threads each, seed by seed, so a busy spell of the machine hits every condition alike.
    """
    import sklearn
    import timm

    started = time.perf_counter()
    before = machine()
    jobs = []
    for index, seed in enumerate(seeds):
        jobs += [(config, seed, condition) for condition in CONDITIONS]
        if index < config["probe_seeds"]:
            jobs.append((config, seed, PROBE))
    with LoadSampler() as load:
        outputs = run_jobs(jobs, workers, threads, echo)
    results = {
        "what": "MaiT small-scale replication: a ViT trained from scratch on scikit-learn's digits, unmasked vs "
        "the paper's schedule vs a random-mask control",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python examples/replicate_small.py", *sys.argv[1:]]),
        "config": config,
        "seeds": list(seeds),
        "conditions": list(CONDITIONS),
        "data": {
            "dataset": "sklearn.datasets.load_digits (1797 images, 8x8, 10 classes), bilinear upsampling",
            "split": f"stratified, fixed (random_state={config['split_seed']}), the same for every run",
            **outputs[0]["data"],
        },
        **collect(outputs, config),
        "machine": {
            **before,
            "load_average_after": machine()["load_average_1_5_15_min"],
            "load_during_run": load.summary(own=workers * threads),
            "workers": workers,
            "threads_per_worker": threads,
        },
        "versions": {
            "attnmask": attnmask.__version__,
            "torch": torch.__version__,
            "timm": timm.__version__,
            "scikit-learn": sklearn.__version__,
            "python": platform.python_version(),
        },
        "wall_seconds": time.perf_counter() - started,
    }
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 1 seed, 1 epoch, 128 training images; writes to a temp folder"
    )
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds 0, 1, ... (default 5; --quick 1)")
    parser.add_argument("--epochs", type=int, default=None, help=f"epochs per run (default {CONFIG['epochs']})")
    parser.add_argument(
        "--probe-seeds", type=int, default=None, help=f"seeds of the probe run (default {CONFIG['probe_seeds']})"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="results JSON (default examples/results/replicate_small.json)"
    )
    parser.add_argument("--figures", type=Path, default=None, help="folder of the two figures (default docs/img)")
    parser.add_argument(
        "--workers", type=int, default=None, help="parallel runs, one process each (default min(2, cores); --quick 1)"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads per run (default 1: a tiny model gains little from more, "
        "and threads that wait for a busy core slow every step down)",
    )  # fmt: skip
    parser.add_argument("--busy", default=None, help="a note for the JSON on other work sharing the machine")
    parser.add_argument(
        "--plot-only", action="store_true", help="redraw the figures from the results JSON (--out) without training"
    )
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    config = dict(CONFIG, **(QUICK if args.quick else {}))
    if args.epochs is not None:
        config["epochs"] = args.epochs
    if args.probe_seeds is not None:
        config["probe_seeds"] = args.probe_seeds
    seeds = list(range(args.seeds if args.seeds is not None else (1 if args.quick else 5)))
    workers = args.workers or (1 if args.quick else max(1, min(2, os.cpu_count() or 1)))
    scratch = Path(tempfile.mkdtemp(prefix="replicate_small_")) if args.quick else None
    out = args.out or (scratch / "replicate_small.json" if scratch else ROOT / "examples/results/replicate_small.json")
    figures = args.figures or scratch or ROOT / "docs" / "img"

    if args.plot_only:
        results = json.loads(out.read_text())
        draw(results, figures)
        print(f"figures redrawn from {out} in {figures}")
        return 0
    results = run(config, seeds, workers=workers, threads=args.threads)
    results["quick"] = args.quick
    results["machine"]["busy_note"] = args.busy
    draw(results, figures)
    results["figures"] = [str(figures / "replicate_accuracy.png"), str(figures / "replicate_als.png")]
    if not args.quick and figures.resolve().is_relative_to(ROOT):
        results["figures"] = [os.path.relpath(p, ROOT) for p in results["figures"]]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")

    for condition in CONDITIONS:
        stats = results["summary"][condition]
        mean, std = stats["mean"] * 100, stats["std"] * 100
        print(f"{condition:>8}: {mean:.2f} +- {std:.2f}% test accuracy ({len(seeds)} seeds)")
    locality = results["locality"]
    print(
        "ALS per layer, trained unmasked model: "
        + ", ".join(f"{v:.2f}" for v in locality["unmasked_trained_per_layer"])
        + f" (uniform attention {locality['uniform']['all_tokens']:.2f})"
    )
    if results["probe"]:
        print(
            "ALS per layer, soft-masked head 0 (probe): "
            + ", ".join(f"{v:.2f}" for v in results["probe"]["masked_head_per_layer"])
        )
    print(f"wall time {results['wall_seconds']:.0f} s; results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
