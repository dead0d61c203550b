"""Fine-tuning as the paper's CUB table (issue 12): DATA.DATASET cub in the official
CUB_200_2011 layout, the configs/finetune recipe through the CLI from --pretrained weights with
layer-wise LR decay and EMA on, and an exact auto-resume. The network is shrunk (tiny model, 32x32
images), the recipe is the config's."""
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import pipeline_helpers as h
from config import load_config
from data import DataError
from data.cub import CUBDataset
from models import build_model
from utils import load_checkpoint_file

CFG = os.path.join(h.ROOT, "configs", "finetune", "MG-SSAF-T-CUB-448.yaml")
SPECIES = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]
TRAIN_PER_CLASS, TEST_PER_CLASS = 4, 2


def make_cub(root: str) -> str:
    """A CUB_200_2011 folder of 3 species: list files as released, JPEGs of bird-photo shapes;
    train and test images interleaved in images.txt as in the real file."""
    rng = np.random.default_rng(0)
    images, labels, split = [], [], []
    for c, species in enumerate(SPECIES, start=1):
        os.makedirs(os.path.join(root, "images", species))
        for i in range(TRAIN_PER_CLASS + TEST_PER_CLASS):
            name = f"{species}/{species.split('.')[1]}_{i:04d}_{100 + i}.jpg"
            height, width = (48, 64) if i % 2 else (64, 40)
            pixels = rng.integers(0, 90, (height, width, 3), dtype=np.uint8)
            pixels[..., (c - 1) % 3] += 160
            Image.fromarray(pixels).save(os.path.join(root, "images", name), quality=90)
            images.append(name)
            labels.append(c)
            split.append(1 if i % 3 else 0)  # 4 train, 2 test per species
    with open(os.path.join(root, "classes.txt"), "w") as f:
        f.writelines(f"{c} {s}\n" for c, s in enumerate(SPECIES, start=1))
    for name, values in (("images.txt", images), ("image_class_labels.txt", labels),
                         ("train_test_split.txt", split)):
        with open(os.path.join(root, name), "w") as f:
            f.writelines(f"{i} {v}\n" for i, v in enumerate(values, start=1))
    return root


@pytest.fixture(scope="module")
def cub(tmp_path_factory) -> str:
    return make_cub(str(tmp_path_factory.mktemp("cub") / "CUB_200_2011"))


@pytest.fixture(scope="module")
def imagenet_checkpoint(tmp_path_factory) -> str:
    """Weights of the tiny network as if trained on a 5-class ImageNet: a project checkpoint."""
    config = load_config(CFG, TINY_RUN + ["MODEL.NUM_CLASSES", "5"])
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("imagenet") / "ckpt_epoch_299.pth")
    torch.save({"model": build_model(config).state_dict(), "config": config, "epoch": 299}, path)
    return path


# The tiny network of the pipeline tests (MODEL.NAME h.MODEL_NAME); the schedule and optimizer
# stay the recipe's.
TINY_RUN = [v for key, value in zip(h.TINY[::2], h.TINY[1::2])
            if key not in ("TRAIN.BASE_LR", "TRAIN.WARMUP_EPOCHS") for v in (key, value)]
FINETUNE_OPTS = ("MODEL.NUM_CLASSES", "3", "TRAIN.EPOCHS", "2", "TRAIN.LAYER_DECAY", "0.75",
                 "MODEL_EMA", "true", "MODEL_EMA_DECAY", "0.5", "DETERMINISTIC", "true")


def _finetune(cub: str, pretrained: str, output: str, tag: str):
    argv = ["--cfg", CFG, "--data-path", cub, "--pretrained", pretrained, "--output", output,
            "--tag", tag, "--batch-size", "4", "--opts", *TINY_RUN, *FINETUNE_OPTS]
    return h.run_cli(argv)


def _run_dir(output: str, tag: str) -> str:
    return os.path.join(output, h.MODEL_NAME, tag)


def test_cub_reads_the_official_split(cub):
    config = load_config(CFG)
    train = CUBDataset(cub, True, None, False)
    test = CUBDataset(cub, False, None, False)
    assert (len(train), len(test)) == (3 * TRAIN_PER_CLASS, 3 * TEST_PER_CLASS)
    assert train.classes == SPECIES and test.classes == SPECIES
    assert sorted(set(train.targets)) == [0, 1, 2]
    assert train.samples[0][0] == os.path.join(cub, "images", SPECIES[0],
                                               "Black_footed_Albatross_0001_101.jpg")
    assert config.DATA.DATASET == "cub" and config.DATA.IMG_SIZE == 448
    assert config.MODEL.NUM_CLASSES == 200


@pytest.mark.parametrize("damage, message", [
    (lambda root: os.remove(os.path.join(root, "train_test_split.txt")),
     "train_test_split.txt not found: DATA.DATA_PATH (--data-path) must be the CUB_200_2011"),
    (lambda root: open(os.path.join(root, "images.txt"), "a").write("oops\n"),
     "images.txt, line 19: expected '<id> <value>', got 'oops'"),
    (lambda root: open(os.path.join(root, "images.txt"), "a").write("19 x/y.jpg\n"),
     "image_class_labels.txt: no line for image id(s) [19] of images.txt"),
    (lambda root: os.remove(os.path.join(root, "images", SPECIES[1],
                                         "Laysan_Albatross_0001_101.jpg")),
     "1 image(s) listed in"),
    (lambda root: open(os.path.join(root, "image_class_labels.txt"), "a").write("1 7\n"),
     "line 19: id 1 appears twice"),
])
def test_cub_errors_name_the_file_and_line(cub, tmp_path, damage, message):
    root = str(tmp_path / "CUB_200_2011")
    shutil.copytree(cub, root)
    damage(root)
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        CUBDataset(root, True, None, False)


def _set_line(root: str, name: str, number: int, text: str) -> None:
    """Replaces line ``number`` of the list file ``name`` by ``text``."""
    path = os.path.join(root, name)
    with open(path) as f:
        lines = f.read().splitlines()
    lines[number - 1] = text
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def _file_of_image(root: str, number: int) -> str:
    """The images.txt path of image ``number``."""
    with open(os.path.join(root, "images.txt")) as f:
        return f.read().splitlines()[number - 1].split()[1]


FIRST = f"{SPECIES[0]}/Black_footed_Albatross_0000_100.jpg"  # image 1 (test split)
SECOND = f"{SPECIES[0]}/Black_footed_Albatross_0001_101.jpg"  # image 2 (train split)


@pytest.mark.parametrize("damage, message", [
    # a path outside images/: absolute, or leaving it through '..' (the file exists there)
    (lambda root: _set_line(root, "images.txt", 2, f"2 {os.path.join(root, 'outside.jpg')}"),
     "images.txt, line 2: image 2 has path '{root}/outside.jpg', expected a path of a file under "
     "images/ (relative, without '..' leading out of it)"),
    (lambda root: _set_line(root, "images.txt", 2, "2 ../outside.jpg"),
     "images.txt, line 2: image 2 has path '../outside.jpg', expected a path of a file under"),
    (lambda root: _set_line(root, "images.txt", 2, f"2 {SPECIES[0]}/../../outside.jpg"),
     f"images.txt, line 2: image 2 has path '{SPECIES[0]}/../../outside.jpg', expected"),
    (lambda root: _set_line(root, "images.txt", 2, "2 ."), "line 2: image 2 has path '.'"),
    # one file under two ids: written the same, written another way, reached through a link
    (lambda root: _set_line(root, "images.txt", 2, f"2 {FIRST}"),
     f"images.txt, line 2: image 2 ({FIRST}) is the file of image 1 (line 1, {FIRST}): one image "
     "under two ids"),
    (lambda root: _set_line(root, "images.txt", 2, f"2 ./{SPECIES[0]}//x/../{FIRST.split('/')[1]}"),
     "images.txt, line 2: image 2 (./001.Black_footed_Albatross//x/../"
     "Black_footed_Albatross_0000_100.jpg) is the file of image 1 (line 1"),
    (lambda root: (os.symlink(SPECIES[0], os.path.join(root, "images", "alias")),
                   _set_line(root, "images.txt", 2, f"2 alias/{FIRST.split('/')[1]}")),
     "images.txt, line 2: image 2 (alias/Black_footed_Albatross_0000_100.jpg) is the file of "
     "image 1"),
    # label and split lines for ids that images.txt does not list
    (lambda root: open(os.path.join(root, "image_class_labels.txt"), "a").write("19 1\n"),
     "image_class_labels.txt, line 19: image id 19 is not in {root}/images.txt"),
    (lambda root: open(os.path.join(root, "train_test_split.txt"), "a").write("\n27 0\n"),
     "train_test_split.txt, line 20: image id 27 is not in {root}/images.txt"),
    (lambda root: _set_line(root, "train_test_split.txt", 3, "3 2"),
     "train_test_split.txt, line 3: image 3 has '2', expected one of 0..1"),
])
def test_cub_refuses_paths_out_of_images_shared_files_and_unknown_ids(cub, tmp_path, damage,
                                                                      message):
    root = str(tmp_path / "CUB_200_2011")
    shutil.copytree(cub, root)
    shutil.copy(os.path.join(root, "images", SECOND), os.path.join(root, "outside.jpg"))
    shutil.copy(os.path.join(root, "images", SECOND), str(tmp_path / "outside.jpg"))
    damage(root)
    for is_train in (True, False):  # refused whichever split is read
        with pytest.raises(DataError) as error:
            CUBDataset(root, is_train, None, False)
        assert message.format(root=root) in str(error.value)


def test_cub_reads_through_symlinked_images_and_class_folders(cub, tmp_path):
    # images/ on another disk (a link to it), and one class folder linked from a third place
    root = str(tmp_path / "CUB_200_2011")
    os.makedirs(root)
    for name in ("classes.txt", "images.txt", "image_class_labels.txt", "train_test_split.txt"):
        shutil.copy(os.path.join(cub, name), root)
    other_disk = str(tmp_path / "other_disk" / "cub_images")
    shutil.copytree(os.path.join(cub, "images"), other_disk)
    third = str(tmp_path / "third" / SPECIES[2])
    shutil.move(os.path.join(other_disk, SPECIES[2]), third)
    os.symlink(third, os.path.join(other_disk, SPECIES[2]))
    os.symlink(other_disk, os.path.join(root, "images"))
    expected = CUBDataset(cub, True, None, False)
    for is_train, count in ((True, 3 * TRAIN_PER_CLASS), (False, 3 * TEST_PER_CLASS)):
        dataset = CUBDataset(root, is_train, None, False)
        assert len(dataset) == count
    train = CUBDataset(root, True, None, False)
    assert train.targets == expected.targets
    assert [os.path.relpath(p, root) for p, _ in train.samples] == [
        os.path.relpath(p, cub) for p, _ in expected.samples]
    image, label = train[len(train) - 1]  # read through both links
    assert label == 2 and image.size == Image.open(expected.samples[-1][0]).size


@pytest.fixture(scope="module")
def finetune_run(cub, imagenet_checkpoint, tmp_path_factory):
    output = str(tmp_path_factory.mktemp("finetune"))
    result = _finetune(cub, imagenet_checkpoint, output, "reference")
    assert result.returncode == 0, result.stdout[-4000:]
    return output, result.stdout


def test_finetune_cli_with_layer_decay_and_ema(finetune_run, imagenet_checkpoint):
    output, log = finetune_run
    assert "6 validation images, 12 training images" in log
    assert (f"{imagenet_checkpoint}: head.weight has shape (5, 64), the model (3, 64): the head "
            "starts from its initialisation") in log
    assert f"loaded pretrained weights from {imagenet_checkpoint}" in log
    assert "EMA weights:" in log and "(model or EMA weights)" in log
    folder = _run_dir(output, "reference")
    metrics = h.read_metrics(folder)
    assert sorted(metrics) == [0, 1]
    for row in metrics.values():
        assert {"acc1", "acc1_ema", "acc5_ema", "loss_ema"} <= set(row)
    ckpt = load_checkpoint_file(os.path.join(folder, "ckpt_epoch_1.pth"))
    assert set(ckpt["model_ema"]) == set(ckpt["model"])
    assert any(not torch.equal(ckpt["model_ema"][k], ckpt["model"][k]) for k in ckpt["model"])
    assert ckpt["max_accuracy"] == max(max(r["acc1"], r["acc1_ema"]) for r in metrics.values())
    scales = [g["lr_scale"] for g in ckpt["optimizer"]["param_groups"]]
    assert scales == sorted(scales, reverse=True) and scales[0] == 1.0
    assert min(scales) == pytest.approx(0.75 ** 5)  # stem, 4 blocks, head: 6 groups
    assert ckpt["optimizer"]["param_groups"][0]["momentum"] == 0.9  # the recipe's SGD


def test_finetune_auto_resume_after_an_epoch_is_exact(finetune_run, cub, imagenet_checkpoint):
    output, _ = finetune_run
    reference = _run_dir(output, "reference")
    folder = _run_dir(output, "resumed")
    shutil.copytree(reference, folder)
    os.remove(os.path.join(folder, "ckpt_epoch_1.pth"))
    result = _finetune(cub, imagenet_checkpoint, output, "resumed")
    assert result.returncode == 0, result.stdout[-4000:]
    assert "resumed from " + os.path.join(folder, "ckpt_epoch_0.pth") in result.stdout
    expected, got = h.read_metrics(reference)[1], h.read_metrics(folder)[1]
    for key in ("train_loss", "val_loss", "acc1", "loss_ema", "acc1_ema", "lr", "num_updates"):
        assert got[key] == expected[key], key
    a = load_checkpoint_file(os.path.join(reference, "ckpt_epoch_1.pth"))
    b = load_checkpoint_file(os.path.join(folder, "ckpt_epoch_1.pth"))
    for part in ("model", "model_ema"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part


@pytest.mark.parametrize("opts, message", [
    (["TRAIN.LAYER_DECAY", "0.0"],
     "TRAIN.LAYER_DECAY must be in (0, 1] (1 switches it off), got 0.0"),
    (["MODEL_EMA_DECAY", "1.0"], "MODEL_EMA_DECAY must be in (0, 1), got 1.0"),
])
def test_bad_layer_decay_or_ema_decay_exits_1_naming_the_key(cub, tmp_path, opts, message):
    result = h.run_cli(["--cfg", CFG, "--data-path", cub, "--output", str(tmp_path), "--opts",
                        *TINY_RUN, *opts])
    assert result.returncode == 1 and message in result.stdout
    assert not os.listdir(tmp_path)  # rejected before anything is written
