"""Coverage sweep: one small model per timm architecture and per Hugging Face vision model type.

Every model is built with random weights from its configuration (nothing is downloaded) and
checked with :func:`attnmask.coverage.check_model`: the first head of each attention layer
masked with a 3 x 3 window; on the first masked attention call, zero weight outside the
window and positive weight inside it for the masked head, weight outside the window for a
global head; the layer's input token under the query patch found by perturbing the image
(layers that see the whole image); and `remove` bit for bit. Each architecture gets one row:

- ``patched``: every check passed;
- ``refused``: attnmask refuses the model, with the reason;
- ``not a grid model``: no module computes attention between tokens;
- ``failed``: patched, but a check failed (a bug to fix);
- ``error`` / ``skipped``: the host could not build or run the model, or it is too large.

    python benchmarks/coverage_sweep.py                       # timm and transformers, ~10 minutes on 2 cores
    python benchmarks/coverage_sweep.py --library timm --only vision_transformer,pit

Writes ``benchmarks/results/coverage.json`` (``--out``); ``python docs/gen_supported_models.py``
turns it into the table of ``docs/supported-models.md``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pathlib
import re
import sys
import time
from typing import Any, Callable, Optional

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from attnmask.bench.timing import environment, one_line  # noqa: E402
from attnmask.coverage import check_model  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "coverage.json"
SMALL = ("pico", "nano", "atto", "femto", "xxs", "tiny", "xs", "small", "s", "b0", "base")
"""Name parts that suggest a small model, best first."""
MAX_PARAMS = 120.0
"""Models with more parameters (millions) are skipped."""


def smallest(names: list[str]) -> Optional[str]:
    """The name that sounds smallest (``SMALL`` order, then the shortest), at 224 px if any."""

    def rank(name: str) -> tuple:
        parts = re.split(r"[_.]", name)
        size = min((i for p in parts for i, tag in enumerate(SMALL) if re.fullmatch(rf"{tag}\d*", p)), default=len(SMALL))
        return size, "224" not in name, len(name), name

    return min(names, key=rank) if names else None


def judge(row: dict[str, Any]) -> dict[str, Any]:
    """Name refusals of models without attention ``not a grid model``."""
    if row.get("status") == "refused" and "no module computes attention" in row.get("reason", ""):
        row["status"] = "not a grid model"
    return row


def run_check(row: dict[str, Any], build: Callable[[], tuple]) -> dict[str, Any]:
    start = time.perf_counter()
    forward = None
    try:
        torch.manual_seed(0)
        built = build()
        model, images = built[:2]
        forward = built[2] if len(built) > 2 else None
    except Exception as error:  # noqa: BLE001 - the host's own failure, reported
        return dict(row, status="error", reason=f"build: {one_line(error)}")
    params = sum(p.numel() for p in model.parameters()) / 1e6
    row["params_m"] = round(params, 1)
    if params > MAX_PARAMS:
        return dict(row, status="skipped", reason=f"{params:.0f}M parameters (over {MAX_PARAMS:g}M)")
    try:
        with torch.no_grad():
            forward(model, images) if forward is not None else model(images)
    except Exception as error:  # noqa: BLE001
        return dict(row, status="error", reason=f"forward: {one_line(error)}")
    try:
        row.update(check_model(model, images, forward=forward))
    except Exception as error:  # noqa: BLE001
        row.update(status="failed", reason=one_line(error))
    row["seconds"] = round(time.perf_counter() - start, 1)
    return judge(row)


# -- timm ---------------------------------------------------------------------------------

def timm_model(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    import timm

    model = timm.create_model(name, pretrained=False).eval()
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    images = torch.randn(1, *cfg.get("input_size", (3, 224, 224)), generator=torch.Generator().manual_seed(0))
    return model, images


def _registered_by_attnmask(name: str) -> bool:
    """Whether timm's model ``name`` is one of attnmask's own (already masked at creation:
    not a host architecture to patch)."""
    from timm.models import model_entrypoint

    return getattr(model_entrypoint(name), "__module__", "").startswith("attnmask")


def timm_rows(only: Optional[list[str]] = None) -> list[dict[str, Any]]:
    import timm

    rows = []
    for module in only or sorted(timm.list_modules()):
        names = [n for n in timm.list_models(module=module) if not _registered_by_attnmask(n)]
        if not names and not only:
            continue  # attnmask's own MaiT models (registered with timm once attnmask.models is imported)
        name = smallest(names)
        row = {"library": "timm", "arch": module, "model": name}
        if name is None:
            rows.append(dict(row, status="error", reason="no model names"))
            continue
        rows.append(run_check(row, lambda: timm_model(name)))
        print(f"timm {module}: {rows[-1]['status']} {name} {rows[-1].get('reason', '')[:150]}", flush=True)
    return rows


# -- transformers -------------------------------------------------------------------------

TINY = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=64, patch_size=8,
    projection_dim=32, num_channels=3, embed_dim=32, vision_embed_dim=32,
)
SUBCONFIGS = ("vision_config", "text_config", "qformer_config", "backbone_config", "encoder_config")


def shrink(config, image_size: int = 64):
    """A tiny version of a transformers config: small sizes wherever the config has them."""
    staged = isinstance(getattr(config, "depths", None), (list, tuple))  # per-stage sizes (Swin): keep them
    for key, value in TINY.items():
        if staged and key != "image_size":
            continue
        current = getattr(config, key, None)
        if current is None or isinstance(current, bool) or isinstance(current, (list, tuple)) and key != "image_size":
            continue  # per-stage lists (Swin's heads per stage) keep their defaults
        if key == "image_size":
            value = image_size
        try:
            setattr(config, key, [value, value] if isinstance(current, (list, tuple)) else value)
        except Exception:  # noqa: BLE001 - strict configs reject some fields; keep the default
            pass
    for key in SUBCONFIGS:
        sub = getattr(config, key, None)
        if sub is not None and hasattr(sub, "to_dict"):
            shrink(sub, image_size)
    return config


def naflex_forward(patch: int) -> Callable:
    """``(model, images) -> output`` for NaFlex models (SigLIP2): the image cut into row-major
    patch vectors, one padding token after them, ``spatial_shapes`` and the padding mask."""

    def forward(model, images):
        b, c, h, w = images.shape
        patches = images.reshape(b, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 3, 5, 1)
        patches = patches.reshape(b, (h // patch) * (w // patch), patch * patch * c)
        pixel_values = torch.cat([patches, patches.new_zeros(b, 1, patches.shape[-1])], dim=1)
        mask = torch.ones(b, pixel_values.shape[1], dtype=torch.long)
        mask[:, -1] = 0
        shapes = torch.tensor([[h // patch, w // patch]] * b)
        return model(pixel_values=pixel_values, pixel_attention_mask=mask, spatial_shapes=shapes)

    return forward


def is_naflex(config) -> bool:
    vision = getattr(config, "vision_config", None) or config
    return getattr(vision, "num_patches", None) is not None and getattr(vision, "patch_size", None) is not None


def vision_types() -> list[str]:
    """Model types whose config (or vision sub-config) has an image size and a patch size, or
    a patch size and a number of patches (NaFlex)."""
    from transformers import CONFIG_MAPPING

    out = []
    for model_type in sorted(CONFIG_MAPPING.keys()):
        try:
            config = CONFIG_MAPPING[model_type]()
        except Exception:  # noqa: BLE001
            continue
        if model_type.endswith(("_text_model", "_text")):
            continue
        vision = getattr(config, "vision_config", None) or config
        if getattr(vision, "image_size", None) is not None and getattr(vision, "patch_size", None) is not None or is_naflex(config):
            out.append(model_type)
    return out


def hf_model(model_type: str, image_size: int = 64) -> tuple[torch.nn.Module, torch.Tensor]:
    from transformers import AutoConfig, AutoModel

    config = shrink(AutoConfig.for_model(model_type), image_size)
    try:
        model = AutoModel.from_config(config)
    except ValueError as error:  # a vision sub-config: its model class sits next to the config's
        if "Unrecognized configuration class" not in str(error):
            raise
        modeling = importlib.import_module(type(config).__module__.replace(".configuration_", ".modeling_"))
        model = getattr(modeling, type(config).__name__.replace("Config", "Model"))(config)
    model = model.eval()
    vision_config = getattr(config, "vision_config", None) or config
    for attr in ("vision_model", "vision_tower", "visual", "vision_encoder"):
        tower = getattr(model, attr, None)
        if isinstance(tower, torch.nn.Module):
            model = tower
            break
    size = getattr(vision_config, "image_size", None) or image_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    channels = getattr(vision_config, "num_channels", 3) or 3
    images = torch.randn(1, channels, *size, generator=torch.Generator().manual_seed(0))
    if is_naflex(config):
        return model, images, naflex_forward(int(vision_config.patch_size))
    return model, images


def hf_rows(only: Optional[list[str]] = None) -> list[dict[str, Any]]:
    rows = []
    for model_type in only or vision_types():
        row = {"library": "transformers", "arch": model_type, "model": f"tiny {model_type} config"}
        result = run_check(dict(row), lambda: hf_model(model_type))
        if result["status"] in ("failed", "error") and not result.get("reason", "").startswith("build"):
            # at 64 px some grids are too small for a 3 x 3 window, or the host fails: try 224 px
            retry = run_check(dict(row, image_size=224), lambda: hf_model(model_type, 224))
            result = retry if retry["status"] == "patched" else dict(result, retry_224=retry.get("reason", retry["status"]))
        rows.append(result)
        print(f"hf {model_type}: {rows[-1]['status']} {rows[-1].get('reason', '')[:150]}", flush=True)
    return rows


def versions() -> dict[str, str]:
    out = {"torch": torch.__version__}
    for name in ("timm", "transformers", "torchvision"):
        try:
            out[name] = importlib.import_module(name).__version__
        except ImportError:
            pass
    return out


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--library", choices=("timm", "transformers", "all"), default="all")
    parser.add_argument("--only", help="comma-separated timm modules or transformers model types")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    only = args.only.split(",") if args.only else None
    rows: list[dict[str, Any]] = []
    if args.library in ("timm", "all"):
        rows += timm_rows(only)
    if args.library in ("transformers", "all"):
        rows += hf_rows(only)
    data = {
        "script": "benchmarks/coverage_sweep.py",
        "versions": versions(),
        "env": environment(torch.device("cpu"), "float32"),
        "rows": rows,
    }
    pathlib.Path(args.out).write_text(json.dumps(data, indent=1) + "\n")
    for library in ("timm", "transformers"):
        statuses = [r["status"] for r in rows if r["library"] == library]
        if statuses:
            print(library, {s: statuses.count(s) for s in sorted(set(statuses))})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
