"""The bundled digits dataset: a fixed, stratified, disjoint split of real 8x8 scans."""
import numpy as np
import torch
from torchvision import transforms

from data.digits import NUM_CLASSES, build_digits_dataset, digits_split


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
