"""Load saved folders in a fresh process and write their outputs (run by ``test_hub.py``).

usage: python hub_fresh.py MANIFEST OUT_DIR

MANIFEST (JSON) gives ``mode`` and, per test case, the saved ``folder``, ``library``,
``auto_class`` and the ``inputs`` file (safetensors). The script writes
``OUT_DIR/outputs.safetensors`` (tensors named ``case/loader/output``) and
``OUT_DIR/results.json`` (specs, reports, errors), which the tests compare with what the
in-memory masked models gave.

Modes:

- ``attnmask``: ``import attnmask`` first (then transformers, when loading), load every folder
  with ``attnmask.from_pretrained`` and the Hugging Face ones with transformers' own
  ``AutoModel*.from_pretrained`` too.
- ``without-attnmask``: attnmask cannot be imported (as if not installed); load with plain
  transformers and timm, record what happens; then allow ``import attnmask`` (transformers is
  already imported: the post-import hook runs at once) and load a Hugging Face folder again.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parent))
from hub_cases import forward  # noqa: E402

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


class BlockAttnmask:
    """A meta path finder that makes ``import attnmask`` fail as if it were not installed."""

    def find_spec(self, name, path=None, target=None):
        if name == "attnmask" or name.startswith("attnmask."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


def run_attnmask(manifest: dict, outputs: dict, results: dict) -> None:
    import attnmask

    results["transformers_imported_by_attnmask"] = "transformers" in sys.modules
    for case_id, entry in manifest["cases"].items():
        x = load_file(entry["inputs"])["x"]
        loaders = [("attnmask", attnmask.from_pretrained)]
        if entry["library"] == "transformers":
            import transformers

            loaders.append(("auto", getattr(transformers, entry["auto_class"]).from_pretrained))
        for loader, load in loaders:
            model = load(entry["folder"]).eval()
            spec = attnmask.get_spec(model)
            results[f"{case_id}/{loader}"] = {
                "class": type(model).__name__,
                "spec": spec.to_dict() if spec else None,
                "report": attnmask.describe(model).to_dict(),
            }
            for name, tensor in forward(model, x).items():
                outputs[f"{case_id}/{loader}/{name}"] = tensor


def run_without_attnmask(manifest: dict, outputs: dict, results: dict) -> None:
    blocker = BlockAttnmask()
    sys.meta_path.insert(0, blocker)
    try:
        importlib.import_module("attnmask")
    except ImportError:
        results["attnmask_blocked"] = True
    import timm
    import transformers

    for case_id, entry in manifest["cases"].items():
        x = load_file(entry["inputs"])["x"]
        try:
            if entry["library"] == "transformers":
                model = getattr(transformers, entry["auto_class"]).from_pretrained(entry["folder"])
            else:
                model = timm.create_model(f"local-dir:{entry['folder']}", pretrained=True)
        except Exception as error:
            results[f"{case_id}/plain"] = {"error": type(error).__name__, "message": str(error)}
            continue
        results[f"{case_id}/plain"] = {"class": type(model).__name__}
        for name, tensor in forward(model.eval(), x).items():
            outputs[f"{case_id}/plain/{name}"] = tensor
    sys.meta_path.remove(blocker)
    import attnmask

    for case_id in manifest.get("late_import", []):
        entry = manifest["cases"][case_id]
        model = getattr(transformers, entry["auto_class"]).from_pretrained(entry["folder"]).eval()
        spec = attnmask.get_spec(model)
        results[f"{case_id}/late"] = {"spec": spec.to_dict() if spec else None}
        for name, tensor in forward(model, load_file(entry["inputs"])["x"]).items():
            outputs[f"{case_id}/late/{name}"] = tensor


def main(manifest_path: str, out_dir: str) -> None:
    manifest = json.loads(Path(manifest_path).read_text())
    outputs: dict[str, torch.Tensor] = {}
    results: dict = {}
    {"attnmask": run_attnmask, "without-attnmask": run_without_attnmask}[manifest["mode"]](manifest, outputs, results)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(outputs, str(out / "outputs.safetensors"))
    (out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main(*sys.argv[1:3])
