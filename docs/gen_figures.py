"""Draw the figures of docs/models.md with attnmask.plot.

    python docs/gen_figures.py                      # both figures, into docs/img/
    python docs/gen_figures.py --scores als.json    # locality heatmap of your own scores

``masks.png``: layer 8 of ``mait_t_patch16_224`` (head 0 local, heads 1 and 2 global), the
keys the centre patch may attend to. ``locality.png``: a layers x heads table of attention
locality scores: from ``--scores`` (a JSON list of rows, ``null`` for a missing head, or
``{"scores": rows, "title": "..."}``), else measured with :func:`attnmask.locality_scores`
on a randomly initialised ``mait_t_patch16_224`` and random images (seeded): its masked
heads score high by construction and its global heads about ``|window| / tokens``, so the
figure shows the ``"mait"`` schedule, not what a trained model learns.

Needs timm and matplotlib (``pip install 'attnmask[timm,plot]'``).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

IMG = Path(__file__).resolve().parent / "img"
MODEL = "mait_t_patch16_224"
MASKS_LAYER = 8
DPI = 120


def draw_masks(out: Path) -> Path:
    import timm

    import attnmask.models  # registers the mait_* models
    import attnmask.plot

    model = timm.create_model(MODEL)
    path = out / "masks.png"
    attnmask.plot.masks(model, layer=MASKS_LAYER).savefig(path, dpi=DPI)
    return path


def random_init_scores(images: int = 8, seed: int = 0) -> tuple[torch.Tensor, str]:
    """ALS (3 x 3 window) of a randomly initialised MaiT-T on random images."""
    import timm

    import attnmask
    import attnmask.models  # registers the mait_* models

    torch.manual_seed(seed)
    model = timm.create_model(MODEL).eval()
    pictures = torch.randn(images, 3, 224, 224, generator=torch.Generator().manual_seed(seed))
    scores = attnmask.locality_scores(model, pictures, window=3, batch_size=images, progress=False)
    return scores, "MaiT-T at random init, 3x3 window"


def load_scores(path: Path) -> tuple[torch.Tensor, str]:
    """Scores from JSON: a list of rows (``null`` for NaN) or ``{"scores": rows, "title": ...}``."""
    data = json.loads(path.read_text())
    title = f"ALS: {path.stem}"
    if isinstance(data, dict):
        title = data.get("title", title)
        data = data["scores"]
    rows = [[math.nan if value is None else float(value) for value in row] for row in data]
    return torch.tensor(rows, dtype=torch.float64), title


def draw_locality(out: Path, scores_path: Path | None) -> Path:
    from attnmask import plot

    scores, title = load_scores(scores_path) if scores_path is not None else random_init_scores()
    path = out / "locality.png"
    plot.locality(scores, title=title).savefig(path, dpi=DPI)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scores", type=Path, help="JSON table of locality scores (layers x heads)")
    parser.add_argument("--out", type=Path, default=IMG, help=f"output folder (default {IMG})")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for path in (draw_masks(args.out), draw_locality(args.out, args.scores)):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
