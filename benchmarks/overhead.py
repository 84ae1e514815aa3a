"""Patch overhead per family: each family's default config (random weights) at its default
resolution, unpatched vs patched, timed side by side in one process.

Also checks, on every model, what the adapters promise: ``heads="all"`` in the first layer
changes that layer's attention output and the model's output (max abs change reported;
layer scales initialised near 0, as in CaiT, can make the latter invisible at random init),
and ``remove`` gives bit-identical outputs back.

Run (CPU, a few minutes): ``python benchmarks/overhead.py --out benchmarks/results/overhead_cpu.json``
Options: ``--only hf.vit,timm.swin`` to run some families, ``--batch``, ``--repeats``,
``--device cuda``. Results are JSON with the device name and library versions; a
Markdown table is printed.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

import attnmask


def _timm(name: str, **kwargs) -> Callable[[], torch.nn.Module]:
    def build():
        import timm

        return timm.create_model(name, pretrained=False, **kwargs)

    return build


def _hf(model: str, config: str, **kwargs) -> Callable[[], torch.nn.Module]:
    def build():
        import transformers

        return getattr(transformers, model)(getattr(transformers, config)(**kwargs))

    return build


def _tv(name: str) -> Callable[[], torch.nn.Module]:
    def build():
        import torchvision

        return getattr(torchvision.models, name)()

    return build


# family, model label, builder, image size, window. Window-attention families use window 3:
# their attention windows are 7 x 7 or 8 x 8, so a 7 x 7 locality window would mask nothing.
MODELS = [
    ("timm.vit", "vit_base_patch16_224", _timm("vit_base_patch16_224"), 224, 7),
    ("timm.cait", "cait_xxs24_224", _timm("cait_xxs24_224"), 224, 7),
    ("timm.swin", "swin_tiny_patch4_window7_224", _timm("swin_tiny_patch4_window7_224"), 224, 3),
    ("timm.swin", "swinv2_tiny_window8_256", _timm("swinv2_tiny_window8_256"), 256, 3),
    ("timm.beit", "beit_base_patch16_224", _timm("beit_base_patch16_224"), 224, 7),
    ("timm.eva", "eva02_tiny_patch14_224", _timm("eva02_tiny_patch14_224"), 224, 7),
    ("hf.vit", "ViTModel(ViTConfig())", _hf("ViTModel", "ViTConfig"), 224, 7),
    ("hf.deit", "DeiTModel(DeiTConfig())", _hf("DeiTModel", "DeiTConfig"), 224, 7),
    ("hf.beit", "BeitModel(BeitConfig())", _hf("BeitModel", "BeitConfig"), 224, 7),
    ("hf.dinov2", "Dinov2Model(Dinov2Config())", _hf("Dinov2Model", "Dinov2Config"), 224, 7),
    (
        "hf.dinov2",
        "Dinov2WithRegistersModel(Dinov2WithRegistersConfig())",
        _hf("Dinov2WithRegistersModel", "Dinov2WithRegistersConfig"),
        224,
        7,
    ),
    ("hf.swin", "SwinModel(SwinConfig())", _hf("SwinModel", "SwinConfig"), 224, 3),
    ("hf.vit_mae", "ViTMAEModel(ViTMAEConfig())", _hf("ViTMAEModel", "ViTMAEConfig"), 224, 7),
    ("hf.clip", "CLIPVisionModel(CLIPVisionConfig())", _hf("CLIPVisionModel", "CLIPVisionConfig"), 224, 7),
    ("hf.siglip", "SiglipVisionModel(SiglipVisionConfig())", _hf("SiglipVisionModel", "SiglipVisionConfig"), 224, 7),
    ("torchvision.vit", "vit_b_16", _tv("vit_b_16"), 224, 7),
    ("torchvision.swin", "swin_t", _tv("swin_t"), 224, 3),
    ("torchvision.swin", "swin_v2_t", _tv("swin_v2_t"), 256, 3),
]


def main_tensor(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    for name in ("last_hidden_state", "logits"):
        if isinstance(getattr(out, name, None), torch.Tensor):
            return getattr(out, name)
    return out[0]


def forward(model, images, noise=None) -> torch.Tensor:
    with torch.no_grad():
        if noise is not None:  # ViTMAE: the same random masking for every run
            return main_tensor(model(images, noise=noise))
        return main_tensor(model(images))


def measure(family, label, build, size, window, batch, repeats, device) -> dict:
    torch.manual_seed(0)
    model = build().eval().to(device)
    images = torch.randn(batch, 3, size, size, device=device)
    noise = torch.rand(batch, 4096, device=device)[:, : (size // 16) ** 2] if family == "hf.vit_mae" else None

    # What the adapters promise, on the default config: heads="all" in the first layer
    # changes that layer's attention output and the model's output; remove() is exact.
    one = images[:1]
    one_noise = noise[:1] if noise is not None else None
    first = model.get_submodule(attnmask.describe(model).layers[0].name)
    seen = {}
    hook = first.register_forward_hook(lambda m, a, out: seen.update(out=main_tensor(out)))
    expected = forward(model, one, one_noise)
    expected_first = seen["out"]
    attnmask.apply(model, heads={0: "all"}, window=3)
    patched_out = forward(model, one, one_noise)
    first_change = (seen["out"] - expected_first).abs().max().item()
    output_change = (patched_out - expected).abs().max().item()
    attnmask.remove(model)
    identical = torch.equal(forward(model, one, one_noise), expected)
    hook.remove()

    # Overhead: unpatched and patched copies, interleaved so drift hits both alike.
    patched = attnmask.apply(build().eval().to(device), heads=0.5, window=window)
    patched.load_state_dict(model.state_dict())
    for m in (model, patched):
        forward(m, images, noise)
    times: dict[str, list[float]] = {"baseline": [], "patched": []}
    for _ in range(repeats):
        for name, m in (("baseline", model), ("patched", patched)):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            forward(m, images, noise)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    baseline, masked = statistics.median(times["baseline"]), statistics.median(times["patched"])
    report = attnmask.describe(patched)
    return {
        "family": family,
        "model": label,
        "image_size": size,
        "window": window,
        "heads": "0.5",
        "masked_heads": sum(len(r.heads) for r in report.layers),
        "total_heads": sum(r.num_heads for r in report.layers),
        "baseline_s": baseline,
        "patched_s": masked,
        "ratio": masked / baseline,
        "first_layer_all_heads_attention_change": first_change,
        "first_layer_all_heads_output_change": output_change,
        "remove_bit_identical": identical,
    }


def versions() -> dict:
    out = {"torch": torch.__version__}
    for name in ("timm", "transformers", "torchvision"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated families (default: all)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0: torch's default)")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    only = {f for f in args.only.split(",") if f}
    rows = []
    print(
        "| family | model | px | window | masked heads | baseline s | patched s | ratio "
        "| layer-0 attn change | output change | remove exact |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for family, label, build, size, window in MODELS:
        if only and family not in only:
            continue
        row = measure(family, label, build, size, window, args.batch, args.repeats, device)
        rows.append(row)
        print(
            f"| {family} | {label} | {size} | {window} | {row['masked_heads']}/{row['total_heads']} | "
            f"{row['baseline_s']:.3f} | {row['patched_s']:.3f} | {row['ratio']:.3f} | "
            f"{row['first_layer_all_heads_attention_change']:.2e} | {row['first_layer_all_heads_output_change']:.2e} | "
            f"{row['remove_bit_identical']} |",
            flush=True,
        )
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "dtype": "float32",
        "batch": args.batch,
        "repeats": args.repeats,
        "versions": versions(),
        "rows": rows,
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
