"""How much faster a patched model could get at most: the masked heads made free.

Times, side by side in one process (interleaved rounds, medians), a timm model unpatched,
patched with ``backend="blocked"`` and patched with a stand-in kernel whose masked heads cost
nothing (their output is left at zero; global heads run dense SDPA exactly as in every
backend). The stand-in's speed-up is the ceiling any masked-attention kernel can reach on
that model: the rest of the model (projections, MLPs, norms) and the global heads still run.
The stand-in is for timing only; its outputs are wrong by design.

    python benchmarks/model_cap.py                           # ViT-B/16, 4 blocks, 1024 px, half and all heads
    python benchmarks/model_cap.py --size 224 --heads half --depth 12

Writes ``benchmarks/results/model_cap_<device>.json``; ``benchmarks/plot.py`` puts it on the
Performance page.
"""

from __future__ import annotations

import argparse
import copy
import json
import pathlib
import sys
from typing import Any, Optional

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import attnmask  # noqa: E402
from attnmask import kernels  # noqa: E402
from attnmask.bench.settings import head_fraction, heads_label  # noqa: E402
from attnmask.bench.timing import device_slug, environment, time_interleaved  # noqa: E402
from attnmask.kernels.common import split_heads_into  # noqa: E402

FREE = "masked heads free"


def free_masked_heads(q, k, v, mask, attn_mask=None, dropout_p=0.0, scale=None, **_):
    """Global heads as every backend runs them; masked heads cost nothing (zeros)."""

    def nothing(q_, k_, v_, host, out):
        out.zero_()

    return split_heads_into(q, k, v, mask, attn_mask, nothing, dropout_p=dropout_p, scale=scale)


def measure(name: str, size: int, depth: Optional[int], heads: float, batch: int, repeats: int, device: torch.device) -> dict[str, Any]:
    import timm

    torch.manual_seed(0)
    extra = {} if depth is None else {"depth": depth}
    model = timm.create_model(name, pretrained=False, img_size=size, **extra).to(device).eval()
    models = {"unpatched": model, "blocked": attnmask.apply(copy.deepcopy(model), heads=heads, window=7, backend="blocked")}
    # The stand-in goes in under a registered name, only for this process, and comes back out.
    original = kernels.KERNELS["reference"]
    kernels.KERNELS["reference"] = free_masked_heads
    try:
        models[FREE] = attnmask.apply(copy.deepcopy(model), heads=heads, window=7, backend="reference")
        images = torch.randn(batch, 3, size, size, device=device)

        def infer(m):
            def call():
                with torch.no_grad():
                    m(images)

            return call

        timings = time_interleaved({label: infer(m) for label, m in models.items()}, device, warmup=1, repeats=repeats)
    finally:
        kernels.KERNELS["reference"] = original
    base = timings["unpatched"].ms
    return {
        "model": name, "image_size": size, "depth": len(model.blocks), "batch": batch, "heads": heads,
        "heads_label": heads_label(heads), "window": [7, 7], "mode": "inference",
        "ms": {label: t.ms for label, t in timings.items()},
        "speed": {label: base / t.ms for label, t in timings.items()},
        "samples_ms": {label: t.samples_ms for label, t in timings.items()},
    }


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=4, help="blocks to build the model with (0: the model's own)")
    parser.add_argument("--heads", default="half,all", help="half,all or fractions")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    rows = []
    for text in args.heads.split(","):
        row = measure(args.model, args.size, args.depth or None, head_fraction(text), args.batch, args.repeats, device)
        print(f"{row['model']} {row['image_size']} px, depth {row['depth']}, {row['heads_label']} heads masked: "
              + ", ".join(f"{label} {speed:.3f}x" for label, speed in row["speed"].items()))
        rows.append(row)
    out = pathlib.Path(args.out or ROOT / "benchmarks" / "results" / f"model_cap_{device_slug(device)}.json")
    data = {"script": "benchmarks/model_cap.py", "env": environment(device, "float32"), "rows": rows}
    out.write_text(json.dumps(data, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
