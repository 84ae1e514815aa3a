"""``attnmask inspect``: can attnmask mask this model, and what is masked already?"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from . import quiet_host

DESCRIPTION = """\
Say whether attnmask supports a transformers or timm model, and describe its attention
layers: adapter family, number of layers and heads, patch grid at the configured image size,
prefix tokens (class, distillation, register tokens). For a folder saved by attnmask it also
shows the saved masks (the MaskSpec under config.json's "attnmask" key), in words and per layer.

Only config.json is read (downloaded for a Hub source); the model is built without weights,
so inspecting a large model is quick. SOURCE is what `attnmask convert` accepts.
"""

EPILOG = """\
examples:
  attnmask inspect google/vit-base-patch16-224
  attnmask inspect ./vit-local --json

exit status: 0 supported; 1 not supported or the source cannot be read (one-line reason on
stderr); 2 usage error.
"""


def add_parser(commands) -> None:
    inspect = commands.add_parser(
        "inspect",
        help="is a Hub model or folder supported? its layers, heads, grid, prefix tokens and saved masks",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    inspect.add_argument("source", metavar="SOURCE", help="local folder, org/name, hf-hub:org/name, timm/<name> or timm model name")
    inspect.add_argument("--revision", metavar="REV", help="Hub revision (branch, tag or commit)")
    inspect.add_argument("--json", action="store_true", help="print the report as JSON")
    inspect.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Print the report; return the exit status."""
    quiet_host()
    try:
        from ..hub import inspect_source

        info = inspect_source(args.source, args.revision)
    except Exception as error:  # reported in one line, without a traceback
        print(f"attnmask inspect: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 1
    info = {**info, **convert_status(info)}
    print(json.dumps(info, indent=2) if args.json else render(info))
    if not info["supported"]:  # the reason once, on stderr (the report says "no")
        print(f"attnmask inspect: not supported: {info['reason']}", file=sys.stderr)
        return 1
    return 0


RESAVE = {
    "timm": "timm.models.save_for_hf(timm.create_model('local-dir:{folder}', pretrained=True), '{folder}', "
    "safe_serialization=True) (or push_to_hf_hub(..., safe_serialization=True))",
    "transformers": "AutoModel.from_pretrained('{folder}').save_pretrained('{folder}') (safetensors by default), "
    "with the model's own class for a task model",
}
"""How to re-save a folder's pickled weights as safetensors, per host library."""


def convert_status(info: dict[str, Any]) -> dict[str, Any]:
    """``convertible`` (whether ``attnmask convert`` can read the weights; ``None`` for a Hub
    source, whose weights are not looked at) and, when not, ``convert_advice``."""
    weights = info.get("weights")
    if weights is None or not weights.startswith("missing"):
        return {"convertible": None if weights is None else bool(info["supported"])}
    pickles = weights.partition("(")[2].partition(" only")[0] or "no weights file"
    resave = RESAVE.get(info["library"], RESAVE["transformers"]).format(folder=info["folder"])
    if "only" not in weights:
        advice = f"attnmask convert needs model.safetensors, and {info['folder']} has no weights file"
    else:
        advice = (
            f"attnmask convert cannot read {pickles}: it is a pickle, and attnmask never unpickles (loading a "
            f"pickle can run code); if you trust the file, re-save it as safetensors: {resave}"
        )
    return {"convertible": False, "convert_advice": advice}


def render(info: dict[str, Any]) -> str:
    """The human-readable report."""
    where = f"Hugging Face Hub, cached at {info['folder']}" if info["repo_id"] else "local folder"
    lines = [
        f"source:        {info['source']} ({where})",
        f"library:       {info['library']}, {info['architecture']}",
    ]
    if info["weights"] is not None:
        lines.append(f"weights:       {info['weights']}")
    if info.get("convert_advice"):
        lines.append(f"convert:       not possible: {info['convert_advice']}")
    if not info["supported"]:
        lines.append("supported:     no (reason on stderr)")
        return "\n".join(lines)
    layers = info["layers"]
    heads = sorted({row["num_heads"] for row in layers})
    per_layer = f"{heads[0]} heads each" if len(heads) == 1 else f"{', '.join(str(r['num_heads']) for r in layers)} heads"
    grid = f"{info['grid'][0]} x {info['grid'][1]}" if info["grid"] else "unknown"
    prefix = info["prefix_tokens"] if info["prefix_tokens"] is not None else "unknown"
    lines += [
        f"supported:     yes, family {info['family']}",
        f"attention:     {len(layers)} layers, {per_layer}",
        f"grid:          {grid} (attention geometry at the configured image size)",
        f"prefix tokens: {prefix}",
    ]
    if info["saved"] is None:
        lines.append("saved masks:   none")
    else:
        auto = info["saved"].get("auto_apply", True) and info["library"] == "transformers"
        lines.append("saved masks:   yes" + (" (transformers' from_pretrained applies them once attnmask is imported)" if auto else ""))
        lines += [f"  {line}" for line in info["saved_in_words"]]
    width = max([len("module")] + [len(row["name"]) for row in layers])
    lines.append(f"{'layer':>5}  {'module':<{width}}  {'heads':>5}  local heads")
    for row in layers:
        masked = ",".join(map(str, row["masked_heads"])) or "-"
        lines.append(f"{row['layer']:>5}  {row['name']:<{width}}  {row['num_heads']:>5}  {masked}")
    lines += [f"note: {note}" for note in info["notes"]]
    return "\n".join(lines)
