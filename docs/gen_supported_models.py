"""Writes docs/supported-models.md from the adapter registry (``attnmask.supported()``) and
the coverage sweep's results (``benchmarks/results/coverage.json``).

Run ``python docs/gen_supported_models.py`` after changing ``attnmask/adapters/__init__.py``
or rerunning ``python benchmarks/coverage_sweep.py``; ``tests/test_docs.py`` fails while the
page, the registry and the results disagree.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

PAGE = Path(__file__).with_name("supported-models.md")
RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "coverage.json"
HOSTS = {
    "timm": "timm",
    "transformers": "Hugging Face transformers",
    "torchvision": "torchvision",
    "torch": "Any other model (found by structure)",
}
STATUSES = ("patched", "refused", "not a grid model", "failed", "error", "skipped")

HEADER = """# Supported models

Generated from the adapter registry (`attnmask.supported()`); do not edit by hand, run
`python docs/gen_supported_models.py`.

Family adapters handle the models they know with code written for them; every other model
goes to the structural adapter (`generic`), which finds attention layers by what they do
and learns the grid, the extra tokens and host windows from run-time shapes (see
[Concepts](concepts.md#models-found-by-structure)). The families with their own adapter pass
the same property tests on tiny configurations (`tests/test_families.py`): identity,
float64 reference, locality in the first block, round trip with the state_dict unchanged,
deepcopy, gradients, other input sizes where the host accepts them, and `torch.compile`.
The coverage sweep below tries one model per timm architecture and per transformers
vision model type.

Before patching, `attnmask.inspect(model)` lists what attnmask finds, layer by layer, and
why a layer is refused:

```python
import attnmask, timm

model = timm.create_model("vit_small_patch16_224")   # or any model you want to patch
print(attnmask.inspect(model))
for family in attnmask.supported():
    print(family["family"], family["tested"])
```
"""

SWEEP = """
## Coverage sweep

`python benchmarks/coverage_sweep.py` builds one small model per timm architecture module
(the smallest-sounding name of `timm.list_models(module=...)`, default configuration) and
one tiny model per transformers model type whose configuration has an image and a patch
size, all with random weights. Each is patched with the first head of every attention layer
masked (3 x 3 window) and checked on the first masked attention call of a forward pass:

- the masked head gives zero weight outside the query patch's window and positive weight
  inside it (so a patch outside cannot change that head's output at the query, and one
  inside does), and a global head of the layer still attends outside the window;
- where the layer sees the whole image (not host windows), perturbing the pixels of one
  patch changes the layer's input most at the token attnmask placed there (within one cell
  after convolutional stems), so grid, orientation and extra tokens were read right;
- `attnmask.remove` gives the unpatched outputs and state dict bit for bit.

*patched*: every check passed. *refused*: attnmask's reason. *not a grid model*: no module
computes attention between tokens. *error*: the host could not build or run the model from
a tiny configuration and `pixel_values` alone (video models, models needing text or prompt
inputs); *skipped*: over 120M parameters.
"""


def _sweep() -> list[str]:
    if not RESULTS.exists():
        return []
    data = json.loads(RESULTS.read_text())
    rows = data["rows"]
    versions = ", ".join(f"{k} {v}" for k, v in data.get("versions", {}).items())
    lines = [SWEEP, f"Host versions of this run: {versions}.\n"]
    for library in ("timm", "transformers"):
        part = [r for r in rows if r["library"] == library]
        if not part:
            continue
        counts = Counter(r["status"] for r in part)
        summary = ", ".join(f"{counts[s]} {s}" for s in STATUSES if counts[s])
        lines.append(f"\n### {HOSTS[library]}: {len(part)} architectures, {summary}\n")
        lines.append("| architecture | model | status | adapter | what the first masked layer attends over, or why not |")
        lines.append("|---|---|---|---|---|")
        order = {s: i for i, s in enumerate(STATUSES)}
        for r in sorted(part, key=lambda r: (order.get(r["status"], 9), r["arch"])):
            detail = r.get("geometry") if r["status"] == "patched" else r.get("reason", "")
            lines.append(
                f"| `{r['arch']}` | `{r.get('model') or '-'}` | {r['status']} | {r.get('family') or '-'} | {_cell(_short(detail or ''))} |"
            )
    return lines


def _short(text: str, limit: int = 240) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ") or "-"


def render() -> str:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import attnmask

    lines = [HEADER]
    families = attnmask.supported()
    for host, title in HOSTS.items():
        rows = [f for f in families if f["host"] == host]
        if not rows:
            continue
        lines.append(f"\n## {title}\n")
        lines.append("| family | models | how it is patched | tested with |")
        lines.append("|---|---|---|---|")
        for f in rows:
            lines.append(f"| `{f['family']}` | {_cell(f['models'])} | {_cell(f['how'])} | {', '.join(f['tested'])} |")
        caveats = [f for f in rows if f["caveats"]]
        if caveats:
            lines.append("\n### Caveats\n")
            for f in caveats:
                lines.append(f"- **`{f['family']}`**: {f['caveats']}")
    lines += _sweep()
    return "\n".join(lines) + "\n"


def main() -> None:
    PAGE.write_text(render())
    print(f"wrote {PAGE}")


if __name__ == "__main__":
    main()
