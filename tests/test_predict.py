"""tools/predict.py through its command line: the class names a training checkpoint stores,
top-k lines per image, a CSV for a folder, ImageNet-1K names for a 1,000-class head."""
import csv
import os

import pytest
import torch
from timm.data import ImageNetInfo

from config import load_config
from models import build_model
from helpers import CFG, TINY_MODEL, run_cli

pytestmark = pytest.mark.cli

OPTS = [*TINY_MODEL, "DATA.IMG_SIZE", "32"]


def _predict(*argv: str) -> str:
    done = run_cli(["tools/predict.py", "--cfg", CFG, *argv, "--opts", *OPTS], prefix=())
    assert done.returncode == 0, done.stdout
    return done.stdout


def test_training_checkpoint_names_the_classes_and_predict_a_folder(reference, data, tmp_path):
    """main.py stores the ImageFolder's class names; predict prints them with probabilities
    for a file, and for a folder writes one CSV row per image."""
    checkpoint = os.path.join(reference, "ckpt_epoch_3.pth")
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
    classes = sorted(os.listdir(os.path.join(data, "val")))
    assert ckpt["class_names"] == classes == ["class0", "class1", "class2"]

    image = os.path.join(data, "val", "class1", "0.png")
    out = _predict("--checkpoint", checkpoint, "--topk", "2", image)
    lines = out.splitlines()
    assert lines[0] == image and len(lines) == 3
    probs = [float(line.split()[0]) for line in lines[1:]]
    assert probs == sorted(probs, reverse=True) and all(0 <= p <= 1 for p in probs)
    assert {line.split()[1] for line in lines[1:]} <= set(classes)

    table = tmp_path / "val.csv"
    out = _predict("--checkpoint", checkpoint, "--csv", str(table), os.path.join(data, "val"))
    with open(table, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["image", "class_1", "prob_1", "class_2", "prob_2", "class_3", "prob_3"]
    assert len(rows) == 1 + 9 and f"wrote 9 predictions to {table}" in out
    for row in rows[1:]:
        assert set(row[1::2]) == set(classes)
        assert abs(sum(float(p) for p in row[2::2]) - 1) < 1e-4


def test_imagenet_names_for_a_1000_class_head(tmp_path, data):
    """A checkpoint without class names whose head has 1,000 classes: ImageNet-1K's names."""
    config = load_config(CFG, [*OPTS, "MODEL.NUM_CLASSES", "1000"])
    torch.manual_seed(0)
    checkpoint = tmp_path / "imagenet.pth"
    torch.save({"model": build_model(config).state_dict()}, checkpoint)
    done = run_cli(["tools/predict.py", "--cfg", CFG, "--checkpoint", str(checkpoint),
                    "--topk", "3", os.path.join(data, "val", "class0", "0.png"),
                    "--opts", *OPTS, "MODEL.NUM_CLASSES", "1000"], prefix=())
    assert done.returncode == 0, done.stdout
    info = ImageNetInfo()
    descriptions = {info.index_to_description(i) for i in range(1000)}
    printed = [line.split(None, 1)[1] for line in done.stdout.splitlines()[1:4]]
    assert len(printed) == 3 and set(printed) <= descriptions


def test_a_checkpoint_of_another_network_is_refused_naming_what_differs(reference, data,
                                                                        tmp_path):
    """predict.py and export.py say which dimension differs, as main.py does, instead of
    PyTorch's first line."""
    checkpoint = os.path.join(reference, "ckpt_epoch_3.pth")
    image = os.path.join(data, "val", "class0", "0.png")
    for argv in (["tools/predict.py", image], ["tools/export.py", "--output", str(tmp_path)]):
        done = run_cli([*argv, "--cfg", CFG, "--checkpoint", checkpoint,
                        "--opts", *OPTS, "MODEL.MGSSAF.EMBED_DIM", "48"], prefix=())
        assert done.returncode == 1, done.stdout
        assert f"{checkpoint}: its weights do not fit this model" in done.stdout
        assert ("embedding width (MODEL.MGSSAF.EMBED_DIM): 24 in the checkpoint, 48 in this "
                "model" in done.stdout), done.stdout
    assert os.listdir(tmp_path) == []  # export wrote nothing


def test_images_go_before_opts(data, tmp_path):
    """--opts takes every argument after it: images after the overrides (alone or after others)
    are refused with an error that says where they go (not argparse's "required: images"), the help says so, and
    after a -- that ends the overrides they are images again."""
    config = load_config(CFG, OPTS)
    torch.manual_seed(0)
    checkpoint = tmp_path / "model.pth"
    torch.save({"model": build_model(config).state_dict()}, checkpoint)
    image = os.path.join(data, "val", "class0", "0.png")
    argv = ["tools/predict.py", "--cfg", CFG, "--checkpoint", str(checkpoint), "--opts", *OPTS]
    done = run_cli([*argv, image], prefix=())
    assert done.returncode == 2, done.stdout
    assert done.stdout.splitlines()[-1] == (
        "predict.py: error: no images given: put the image files or folders before --opts, which "
        "takes every argument after it (or end the overrides with --)")
    # images on both sides: those after --opts are all named, not "an odd number of items"
    done = run_cli([*argv[:5], image, *argv[5:], image, image], prefix=())
    assert done.returncode == 2, done.stdout
    assert done.stdout.splitlines()[-1] == (
        f"predict.py: error: --opts took {image}, {image} as config overrides: put every image "
        "before --opts, which takes every argument after it (or end the overrides with --)")
    done = run_cli([*argv, "--", image], prefix=())
    assert done.returncode == 0, done.stdout
    assert done.stdout.splitlines()[0] == image
    done = run_cli(["tools/predict.py", "--help"], prefix=())
    assert done.returncode == 0, done.stdout
    text = " ".join(done.stdout.split())
    assert "[options] IMAGE [IMAGE ...] [--opts KEY VALUE ...]" in text
    assert ("config overrides, last: --opts takes every argument after it, so the images go "
            "before it (or after a -- that ends the overrides)") in text
