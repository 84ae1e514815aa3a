"""``attnmask convert``: a Hub model (or folder) in, a masked model folder out."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

from ..spec import MODES
from . import parse_heads, parse_window, quiet_host

DESCRIPTION = """\
Convert a Hugging Face transformers or timm model to a masked model folder.

SOURCE is a local folder, a Hub repo id (org/name), hf-hub:org/name, timm/<name> or a timm
model name; append @REVISION to a Hub id for a branch, tag or commit. Hub files go through
the huggingface_hub cache (HF_HUB_OFFLINE=1 uses the cache only). Weights are read from
safetensors only: attnmask never unpickles.

The model is checked first (supported family, --heads against its layers) from config.json
alone, then its weights are loaded, the chosen heads of every attention layer are made local
(a WINDOW neighbourhood of patches around each query patch), and OUT is written:

  config.json        the host library's config, plus the MaskSpec under the "attnmask" key
  model.safetensors  the weights, unchanged
  README.md          model card: base model, the masks in words, how to load it
  preprocessor_config.json  copied from SOURCE when it has one

OUT is written to a temporary folder next to it and renamed when complete: a failure leaves
nothing behind. Load it with attnmask.from_pretrained(OUT); Hugging Face folders also load
masked with transformers' AutoModel*.from_pretrained(OUT) once attnmask is imported, and timm
folders with timm.create_model("local-dir:OUT", pretrained=True) once attnmask is imported.

If SOURCE was itself saved by attnmask, its masks are kept unless --heads, --window,
--prefix or --mode replace them; otherwise --heads and --window are required.
"""

EPILOG = """\
examples:
  attnmask convert google/vit-base-patch16-224 vit-local --heads 6 --window 7
  attnmask convert timm/vit_small_patch16_224.augreg_in21k_ft_in1k vit-s-local --heads 0.5 --window 5
  attnmask convert ./my-vit ./my-vit-local --heads 0,1,2 --window 3x5 --prefix isolated
  attnmask convert ./my-vit ./my-vit-local --heads 3 --window 7 --push-to-hub me/my-vit-local

exit status: 0 success; 2 usage error (bad option, --heads/--window not accepted for this
model, OUT exists without --overwrite); 1 failure (unknown source, no network, unsupported
architecture, invalid config.json, missing weights, failed upload), with a one-line reason.
"""


class UsageError(ValueError):
    """A command-line argument is not accepted (exit status 2)."""


def add_parser(commands) -> None:
    convert = commands.add_parser(
        "convert",
        help="convert a Hub model or folder to a masked model folder (save, optionally push)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    convert.add_argument("source", metavar="SOURCE", help="local folder, org/name, hf-hub:org/name, timm/<name> or timm model name")
    convert.add_argument("out", metavar="OUT", help="output folder (must not exist, unless --overwrite)")
    convert.add_argument(
        "--heads",
        type=parse_heads,
        metavar="HEADS",
        help="heads to make local in every layer: a count (3), a fraction of each layer's heads (0.5), "
        "'all', 'none', head indices (0,2,5), or a schedule over depth (mait, mait-mixed, one-head)",
    )
    convert.add_argument("--window", type=parse_window, metavar="WINDOW", help="odd window size in patches: 7, or rows x cols: 3x5")
    convert.add_argument(
        "--prefix",
        choices=("global", "isolated"),
        help="prefix tokens (class, distillation, registers): 'global' (default: they see and are seen by "
        "every token) or 'isolated' (local heads' patch queries do not see them)",
    )
    convert.add_argument(
        "--mode",
        choices=MODES,
        help="mask mode: 'hard' (default: logits outside the window are -inf, zero attention there; "
        "strictly local, sparse kernels) or 'soft' (the paper's Eq. 2: they are set to 0, so out-of-window "
        "keys keep a little weight; computed densely)",
    )
    convert.add_argument("--revision", metavar="REV", help="Hub revision of SOURCE (branch, tag or commit)")
    convert.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (only a model folder or an empty folder)")
    convert.add_argument(
        "--no-auto-apply",
        dest="auto_apply",
        action="store_false",
        help="Hugging Face models: save so that plain transformers loads the unmasked base model "
        "(default: AutoModel.from_pretrained applies the masks once attnmask is imported, and refuses "
        "the folder without attnmask)",
    )
    convert.add_argument(
        "--push-to-hub",
        metavar="REPO",
        help="then upload OUT to the Hub repository REPO (created if needed; log in with `hf auth login` or HF_TOKEN)",
    )
    convert.add_argument("--private", action="store_true", help="with --push-to-hub: create REPO as a private repository")
    convert.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Run the conversion; return the exit status."""
    quiet_host()
    try:
        convert(args, progress=lambda text: print(text, file=sys.stderr, flush=True))
    except UsageError as error:
        print(f"attnmask convert: {_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("attnmask convert: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # every failure is reported in one line, without a traceback
        print(f"attnmask convert: error: {_line(error)}", file=sys.stderr)
        return 1
    return 0


def convert(args: argparse.Namespace, progress: Callable[[str], None]) -> Path:
    """The steps of ``attnmask convert``; raises :class:`UsageError` for bad arguments."""
    from ..api import describe
    from ..hub.api import check_source, save_pretrained
    from ..hub.apply import apply_saved
    from ..hub.folder import check_target
    from ..hub.push import push_to_hub
    from ..hub.source import REPO_ID, open_source
    from ..spec import normalize_window

    out = Path(args.out)
    try:
        if args.window is not None:
            normalize_window(args.window)
        check_target(out, args.overwrite)
    except (TypeError, ValueError, FileExistsError) as error:
        raise UsageError(str(error).replace("window=", "--window ").replace("overwrite=True (--overwrite)", "--overwrite")) from None
    if args.push_to_hub is not None and not REPO_ID.match(args.push_to_hub):
        raise UsageError(f"--push-to-hub {args.push_to_hub!r} is not accepted: expected a Hub repo id such as your-name/model-name")
    source_dir = Path(args.source).resolve()
    if Path(args.source).is_dir() and (out.resolve() == source_dir or out.resolve() in source_dir.parents):
        raise UsageError(f"OUT {args.out!r} is or contains SOURCE {args.source!r}: choose another output folder")

    progress(f"Reading {args.source} ...")
    src = open_source(args.source, args.revision)
    if src.saved is None and (args.heads is None or args.window is None):
        missing = " and ".join(name for name, value in (("--heads", args.heads), ("--window", args.window)) if value is None)
        verb = "are" if " and " in missing else "is"
        raise UsageError(f"{missing} {verb} required: {args.source} has no saved masks (e.g. --heads 0.5 --window 7)")
    overrides = dict(heads=args.heads, window=args.window, prefix=args.prefix, mode=args.mode)

    progress(f"Checking {src.library} {src.config.get('architecture') or src.config.get('model_type')} from config.json ...")
    host, empty = check_source(src)  # unsupported architecture or bad saved masks: exit 1
    try:
        apply_saved(empty, src.saved, src.config_path, **overrides)
    except (TypeError, ValueError) as error:
        raise UsageError(_line(error).replace("heads=", "--heads ", 1)) from None

    progress("Downloading weights ..." if src.repo_id else f"Loading weights from {src.folder} ...")
    folder = src.fetch_weights()
    model = host.load(folder, src.config)
    apply_saved(model, src.saved, src.config_path, **overrides)

    progress(f"Writing {out} ...")
    save_pretrained(
        model,
        out,
        overwrite=args.overwrite,
        auto_apply=args.auto_apply,
        base_model=src.base_model,
        repo_id=args.push_to_hub,
        include=src.processor_files(),
    )
    print(describe(model))
    print(f"saved {out}: " + ", ".join(sorted(p.name for p in out.iterdir())))
    if args.push_to_hub:
        progress(f"Uploading {out} to {args.push_to_hub} ...")
        try:
            url = push_to_hub(out, args.push_to_hub, private=args.private)
        except Exception as error:
            raise RuntimeError(f"{_line(error)} (the converted folder is kept at {out})") from None
        print(f"pushed to {url}")
    return out


def _line(error: BaseException) -> str:
    """An error as one line (host libraries' messages may span several)."""
    return " ".join(str(error).split()) or type(error).__name__
