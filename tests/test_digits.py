"""The bundled digits dataset: a fixed, stratified, disjoint split of real 8x8 scans."""
import os
import re

import numpy as np
import pytest
import torch
from torchvision import transforms

from config import load_config
from data.build import build_transform
from data.digits import NUM_CLASSES, build_digits_dataset, digits_split
from models import build_model
from helpers import DEMO_CFG, digests, read_metrics, run_cli


def test_split_is_deterministic_and_covers_every_scan_once():
    train_a, val_a = digits_split()
    train_b, val_b = digits_split()
    assert np.array_equal(train_a, train_b) and np.array_equal(val_a, val_b)
    assert len(train_a) + len(val_a) == 1797
    assert not set(train_a.tolist()) & set(val_a.tolist())
    assert sorted(train_a.tolist() + val_a.tolist()) == list(range(1797))
    assert 0.18 < len(val_a) / 1797 < 0.22


def test_builds_agree_and_classes_are_balanced():
    train, val = build_digits_dataset(True), build_digits_dataset(False)
    assert np.array_equal(train.indices, build_digits_dataset(True).indices)
    assert train.classes == [str(c) for c in range(NUM_CLASSES)]
    for split in (train, val):
        counts = np.bincount(split.targets, minlength=NUM_CLASSES)
        share = counts / counts.sum()
        assert share.min() > 0.09 and share.max() < 0.11, counts


def test_items_are_rgb_images_through_the_transform():
    image, label = build_digits_dataset(False)[0]
    assert image.mode == "RGB" and image.size == (8, 8)
    pixels = np.asarray(image)
    assert pixels.dtype == np.uint8 and pixels.max() > 200
    assert np.array_equal(pixels[..., 0], pixels[..., 2])
    assert isinstance(label, int) and 0 <= label < NUM_CLASSES

    transform = transforms.Compose([transforms.Resize(32), transforms.ToTensor()])
    tensor, same_label = build_digits_dataset(False, transform)[0]
    assert tensor.shape == (3, 32, 32) and tensor.dtype == torch.float32
    assert same_label == label


DEMO = DEMO_CFG


def test_demo_config_builds_a_ten_class_model_on_unflipped_digits():
    config = load_config(DEMO)
    assert config.DATA.DATASET == "digits" and config.MODEL.NUM_CLASSES == NUM_CLASSES
    assert config.AUG.HFLIP == 0.0 and config.AUG.MIXUP == 0.0 and config.AUG.CUTMIX == 0.0
    size = config.DATA.IMG_SIZE
    images = torch.stack([build_digits_dataset(True, build_transform(True, config))[i][0]
                          for i in range(2)])
    assert images.shape == (2, 3, size, size)
    assert build_model(config)(images).shape == (2, NUM_CLASSES)


@pytest.mark.cli
def test_demo_learns_and_its_checkpoint_reproduces_the_accuracy(tmp_path):
    """The quick start's commands, the schedule cut to 3 epochs: the last Acc@1 is well above chance
    (10%), and ``--eval --resume`` of the last checkpoint prints the same Acc@1 (its loader with
    workers: the digits pickled to them)."""
    output = str(tmp_path)
    train = run_cli(["--cfg", DEMO, "--output", output,
                     "--opts", "TRAIN.EPOCHS", "3", "TRAIN.WARMUP_EPOCHS", "1"])
    assert train.returncode == 0, train.stdout[-4000:]
    folder = os.path.join(output, load_config(DEMO).MODEL.NAME, "default")
    rows = read_metrics(folder)
    assert sorted(rows) == [0, 1, 2]
    assert rows[2]["acc1"] > 50, rows
    assert train.stdout.count("Accuracy of the network on the 360 test images") == 3
    trained_acc = re.findall(r"\* Acc@1 ([\d.]+)", train.stdout)[-1]

    before = digests(folder)
    evaluate = run_cli(["--cfg", DEMO, "--output", output, "--eval",  # through loader workers
                        "--resume", os.path.join(folder, "ckpt_epoch_2.pth"),
                        "--opts", "DATA.NUM_WORKERS", "2"])
    assert evaluate.returncode == 0, evaluate.stdout[-4000:]
    assert re.findall(r"\* Acc@1 ([\d.]+)", evaluate.stdout) == [trained_acc]
    assert digests(folder) == before  # evaluating leaves the run's checkpoints alone
