"""Writes docs/supported-models.md from the adapter registry (``attnmask.supported()``).

Run ``python docs/gen_supported_models.py`` after changing ``attnmask/adapters/__init__.py``;
``tests/test_docs.py`` fails while the page and the registry disagree.
"""

from __future__ import annotations

import sys
from pathlib import Path

PAGE = Path(__file__).with_name("supported-models.md")
HOSTS = {"timm": "timm", "transformers": "Hugging Face transformers", "torchvision": "torchvision"}

HEADER = """# Supported models

Generated from the adapter registry (`attnmask.supported()`); do not edit by hand, run
`python docs/gen_supported_models.py`.

Every family below passes the same property tests on tiny configurations
(`tests/test_families.py`): identity (no masked heads, or a covering window, gives the
unpatched outputs), float64 reference, locality in the first block, round trip with the
state_dict unchanged, deepcopy, gradients, other input sizes where the host accepts them,
and `torch.compile`. A model of no supported family gets a `TypeError` that lists these
families.

```python
import attnmask
for family in attnmask.supported():
    print(family["family"], family["tested"])
```
"""


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
    return "\n".join(lines) + "\n"


def main() -> None:
    PAGE.write_text(render())
    print(f"wrote {PAGE}")


if __name__ == "__main__":
    main()
