"""``examples/train.py`` end to end on a tiny generated ImageFolder: train, checkpoint, resume."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import attnmask

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train.py"

pytest.importorskip("timm")
pytest.importorskip("torchvision")
Image = pytest.importorskip("PIL.Image")

CLASSES = {"blue": (30, 30, 200), "green": (30, 200, 30), "red": (200, 30, 30)}
MODEL = ["vit_tiny_patch16_224", "--model-kwargs", "img_size=32", "patch_size=8", "depth=3", "embed_dim=48"]
MASKS = ["--mask-heads", "mait", "--window", "3"]
RUN = ["--epochs", "2", "--batch-size", "8", "--workers", "0", "--lr", "1e-3", "--warmup-steps", "2", "--seed", "3"]


def load_script():
    spec = importlib.util.spec_from_file_location("train_example", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script():
    return load_script()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """3 classes of noisy 32 x 32 colour squares; validation images get a random class's colour,
    so top-1 is neither 0 nor 1 and checks a real count."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    colours = list(CLASSES.values())
    for split, count in (("train", 8), ("val", 5)):
        for name, colour in CLASSES.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                base = colour if split == "train" or i < 2 else colours[rng.integers(len(colours))]
                pixels = np.clip(np.array(base) + rng.normal(0, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def train(script, data, output, *extra):
    masks = [] if "--resume" in extra else MASKS  # a resumed run keeps the checkpoint's masks
    argv = [*MODEL, *masks, "--train-dir", str(data / "train"), "--val-dir", str(data / "val"), *RUN]
    argv += ["--output", str(output)]
    assert script.main([*argv, *extra]) == 0
    return json.loads((output / "metrics.json").read_text())


def weights(folder):
    import safetensors.torch

    return safetensors.torch.load_file(str(folder / "model.safetensors"))


def independent_top1(model, folder, data_config):
    """Top-1 of ``model`` on an ImageFolder, computed without the script's code."""
    mean = torch.tensor(data_config["mean"]).view(3, 1, 1)
    std = torch.tensor(data_config["std"]).view(3, 1, 1)
    model.eval()
    correct = total = 0
    for label, name in enumerate(sorted(p.name for p in folder.iterdir())):
        for path in sorted((folder / name).iterdir()):
            pixels = torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255)
            image = (pixels.permute(2, 0, 1) - mean) / std  # 32 x 32 images: resize and crop leave them as they are
            with torch.no_grad():
                output = model(image[None])
            logits = output if isinstance(output, torch.Tensor) else output.logits  # transformers: an output object
            correct += int(logits.argmax(1).item() == label)
            total += 1
    return correct / total


def test_train_checkpoint_resume(script, data, tmp_path, capsys):
    straight = train(script, data, tmp_path / "straight")
    first = train(script, data, tmp_path / "split", "--stop-after", "1")
    err = capsys.readouterr().err
    assert "epoch 1/2" in err and "img/s" in err and "ETA" in err and "loss" in err

    # the checkpoint is a Hub folder: it reloads masked, as asked
    last = tmp_path / "split" / "last"
    model = attnmask.from_pretrained(last)
    spec = attnmask.get_spec(model)
    assert spec.heads == ((0, 1, 2), (0,), ()) and spec.window == (3, 3) and spec.mode == "hard"
    assert spec.to_dict() == first["spec"]
    state = json.loads((last / "train_state.json").read_text())
    assert state["epoch"] == 1 and state["classes"] == sorted(CLASSES)
    assert (last / "train_state.safetensors").is_file()

    # the top-1 it reports is what an independent evaluation of the saved model finds
    assert first["epochs_done"] == 1 and 0.0 <= first["top1"] <= 1.0 and first["val_images"] == 15
    assert first["top1"] == pytest.approx(independent_top1(model, data / "val", first["data"]), abs=1e-12)
    assert first["train_images_per_s"] > 0

    # resuming for the second epoch ends where the uninterrupted run ends
    resumed = train(script, data, tmp_path / "resumed", "--resume", str(last))
    assert resumed["epochs_done"] == 2
    a, b = weights(tmp_path / "straight" / "last"), weights(tmp_path / "resumed" / "last")
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= 1e-6, f"resumed weights differ from the uninterrupted run's by {worst}"
    assert resumed["top1"] == straight["top1"]
    assert attnmask.get_spec(attnmask.from_pretrained(tmp_path / "resumed" / "last")) == spec


def test_hugging_face_folder(script, data, tmp_path):
    """A transformers backbone folder gets a classifier for the folder's classes and the masks asked for."""
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(
        image_size=32, patch_size=8, hidden_size=48, num_hidden_layers=3, num_attention_heads=3, intermediate_size=96
    )
    transformers.ViTModel(config).save_pretrained(tmp_path / "backbone")
    argv = [str(tmp_path / "backbone"), "--mask-heads", "0,2", "--window", "3", "--mode", "soft"]
    argv += ["--train-dir", str(data / "train"), "--val-dir", str(data / "val"), *RUN]
    argv += ["--stop-after", "1", "--output", str(tmp_path / "run")]
    assert script.main(argv) == 0
    model = attnmask.from_pretrained(tmp_path / "run" / "last")
    spec = attnmask.get_spec(model)
    assert type(model).__name__ == "ViTForImageClassification"
    assert model.config.id2label == dict(enumerate(sorted(CLASSES)))
    assert spec.heads == ((0, 2),) * 3 and spec.mode == "soft"
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["top1"] == pytest.approx(independent_top1(model, data / "val", metrics["data"]))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--window", "4"], "--window"),
        (["--mask-heads", "lots"], "--mask-heads"),
        (["--mode", "medium"], "--mode"),
        (["--mask-heads", "7"], "heads"),  # the model has 3 heads per layer: apply refuses, exit 2 too
    ],
)
def test_bad_argument_exits_2(script, data, tmp_path, capsys, extra, message):
    argv = [*MODEL, "--train-dir", str(data / "train"), *RUN, "--output", str(tmp_path), *extra]
    with pytest.raises(SystemExit) as exit_info:
        script.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and err[-1].startswith("train.py: error:")
    assert not (tmp_path / "last").exists()


def test_command_line(data, tmp_path):
    """As a command: without a model it exits 2, the error on the last line of stderr."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    bad = subprocess.run(
        [sys.executable, str(SCRIPT), "--train-dir", str(data / "train")], capture_output=True, text=True, env=env
    )
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("train.py: error: a model")


def test_save_pretrained_unwraps_training_wrappers(tmp_path):
    """What a training loop holds (compiled, DataParallel) saves as the model inside it."""
    import timm

    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=3)
    attnmask.apply(model, heads=1, window=3)
    wrapped = torch.compile(torch.nn.DataParallel(model))
    attnmask.save_pretrained(wrapped, tmp_path / "m")
    reloaded = attnmask.from_pretrained(tmp_path / "m")
    assert attnmask.get_spec(reloaded) == attnmask.get_spec(model)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in reloaded.state_dict().items())


@pytest.mark.slow
def test_compile_bf16(script, data, tmp_path):
    metrics = train(script, data, tmp_path, "--compile", "--amp", "bf16", "--epochs", "1")
    assert metrics["compile"] and metrics["amp"] == "bf16" and 0.0 <= metrics["top1"] <= 1.0
    assert attnmask.get_spec(attnmask.from_pretrained(tmp_path / "last")).heads == ((0, 1, 2), (0,), ())


@pytest.mark.slow
def test_torchrun_two_processes(data, tmp_path):
    """DDP on CPU (gloo): two processes, rank 0 saves; the checkpoint reloads masked."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT),
        *MODEL, *MASKS, "--train-dir", str(data / "train"), "--val-dir", str(data / "val"), *RUN,
        "--epochs", "1", "--output", str(tmp_path),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["val_images"] == 15
    assert done.stdout.count("top-1") == 1  # only rank 0 prints
    assert attnmask.get_spec(attnmask.from_pretrained(tmp_path / "last")).heads == ((0, 1, 2), (0,), ())
