"""Fine-tuning as the paper's CUB table: DATA.DATASET cub in the official
CUB_200_2011 layout, the configs/finetune recipe through the CLI from --pretrained weights with
layer-wise LR decay and EMA on, and an exact auto-resume. The network is shrunk (tiny model, 32x32
images), the recipe is the config's."""
import os
import shutil

import pytest
import torch
from PIL import Image

import helpers as h
from config import ConfigError, get_config, load_config
from data import DataError
from data.cub import CUBDataset
from lr_scheduler import scale_lrs
from config import parse_option
from models import build_model
from models.checkpoint_io import load_checkpoint_file

CFG = os.path.join(h.ROOT, "configs", "finetune", "MG-SSAF-T-CUB-448.yaml")
SPECIES = h.CUB_SPECIES
TRAIN_PER_CLASS, TEST_PER_CLASS = h.CUB_TRAIN_PER_CLASS, h.CUB_TEST_PER_CLASS


@pytest.fixture(scope="module")
def cub(tmp_path_factory) -> str:
    return h.make_cub(str(tmp_path_factory.mktemp("cub") / "CUB_200_2011"))


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
TINY_RUN = h.without(h.TINY, "TRAIN.BASE_LR", "TRAIN.WARMUP_EPOCHS")
FINETUNE_OPTS = ("MODEL.NUM_CLASSES", "3", "TRAIN.EPOCHS", "2", "TRAIN.LAYER_DECAY", "0.75",
                 "MODEL_EMA", "true", "MODEL_EMA_DECAY", "0.5", "DETERMINISTIC", "true")


def _finetune(cub: str, pretrained: str, output: str, tag: str):
    argv = ["--cfg", CFG, "--data-path", cub, "--pretrained", pretrained, "--output", output,
            "--tag", tag, "--batch-size", "4", "--opts", *TINY_RUN, *FINETUNE_OPTS]
    return h.run_cli(argv)


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


@pytest.mark.cli
def test_finetune_cli_with_layer_decay_and_ema(finetune_run, imagenet_checkpoint):
    output, log = finetune_run
    assert "6 validation images, 12 training images" in log
    # --batch-size 4 is honoured over the config's total batch 16, with a warning
    assert ("DATA.BATCH_SIZE 4 from the command line replaces the config's DATA.TOTAL_BATCH_SIZE "
            "16: total batch 4 (4 per process x 1 process(es) x 1 accumulation step(s)): LR "
            "0.0075, 6 optimizer steps (2 epochs of 3)") in log
    assert (f"{imagenet_checkpoint}: head.weight has shape (5, 64), the model (3, 64): the head "
            "starts from its initialisation") in log
    assert f"loaded pretrained weights from {imagenet_checkpoint}" in log
    assert "EMA weights:" in log and "(model or EMA weights)" in log
    folder = h.run_dir(output, "reference")
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


@pytest.mark.cli
def test_finetune_auto_resume_after_an_epoch_is_exact(finetune_run, cub, imagenet_checkpoint):
    output, _ = finetune_run
    reference = h.run_dir(output, "reference")
    folder = h.run_dir(output, "resumed")
    shutil.copytree(reference, folder)
    os.remove(os.path.join(folder, "ckpt_epoch_1.pth"))
    result = _finetune(cub, imagenet_checkpoint, output, "resumed")
    assert result.returncode == 0, result.stdout[-4000:]
    assert "resumed from " + os.path.join(folder, "ckpt_epoch_0.pth") in result.stdout
    assert h.step_lines(result.stdout)[0] == (1, 0)  # epoch 0 is not trained again
    expected, got = h.read_metrics(reference)[1], h.read_metrics(folder)[1]
    for key in ("train_loss", "val_loss", "acc1", "loss_ema", "acc1_ema", "lr", "num_updates"):
        assert got[key] == expected[key], key
    a = load_checkpoint_file(os.path.join(reference, "ckpt_epoch_1.pth"))
    b = load_checkpoint_file(os.path.join(folder, "ckpt_epoch_1.pth"))
    for part in ("model", "model_ema"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part


@pytest.mark.cli
def test_finetune_under_torchrun_keeps_the_total_batch_lr_and_steps(finetune_run, cub,
                                                                     imagenet_checkpoint,
                                                                     tmp_path):
    # As users run it: 2 processes, loader workers on, AMP as configured, the config's
    # augmentation, layer decay and EMA on. The total batch 4 gives 2 images a process and the
    # LR and steps of the one-process run with --batch-size 4.
    opts = [*h.without(TINY_RUN, "AMP_ENABLE", "DATA.NUM_WORKERS"), *FINETUNE_OPTS,
            "DATA.NUM_WORKERS", "1", "DATA.TOTAL_BATCH_SIZE", "4"]
    result = h.run_cli(["--cfg", CFG, "--data-path", cub, "--pretrained", imagenet_checkpoint,
                        "--output", str(tmp_path), "--tag", "ddp", "--opts", *opts],
                       prefix=h.torchrun())
    assert result.returncode == 0, result.stdout[-4000:]
    folder = h.run_dir(str(tmp_path), "ddp")
    for rank, log in enumerate(h.rank_logs(folder)):
        assert f"rank {rank} of 2" in log
        assert "AMP_ENABLE: true" in log and "NUM_WORKERS: 1" in log and "LAYER_DECAY: 0.75" in log
        assert ("total batch 4 (2 per process x 2 process(es) x 1 accumulation step(s)): LR "
                "0.0075, 6 optimizer steps (2 epochs of 3)") in log
        # 12 training images, 6 a rank: 3 steps of 2 images an epoch on each rank
        assert "Train: [1/2][2/3]" in log and "Train: [1/2][3/" not in log
        assert "6 validation images, 12 training images" in log
        assert "(6 images:" in log and "EMA weights:" in log
    assert "replaces the config's DATA.TOTAL_BATCH_SIZE" not in result.stdout
    metrics = h.read_metrics(folder)
    single = h.read_metrics(h.run_dir(finetune_run[0], "reference"))
    assert [r["num_updates"] for r in metrics.values()] == [3, 6]
    for key in ("num_updates", "lr"):
        assert [r[key] for r in metrics.values()] == [r[key] for r in single.values()], key
    assert all("acc1_ema" in row for row in metrics.values())
    ckpt = load_checkpoint_file(os.path.join(folder, "ckpt_epoch_1.pth"))
    assert ckpt["world_size"] == 2 and ckpt["config"].DATA.BATCH_SIZE == 2
    assert min(g["lr_scale"] for g in ckpt["optimizer"]["param_groups"]) == pytest.approx(
        0.75 ** 5)
    assert any(not torch.equal(ckpt["model_ema"][k], ckpt["model"][k]) for k in ckpt["model"])


@pytest.mark.cli
@pytest.mark.parametrize("opts, message", [
    (["TRAIN.LAYER_DECAY", "0.0"],
     "TRAIN.LAYER_DECAY (--opts) must be in (0, 1] (1 switches it off), got 0.0"),
    (["MODEL_EMA_DECAY", "1.0"], "MODEL_EMA_DECAY (--opts) must be in (0, 1), got 1.0"),
])
def test_bad_layer_decay_or_ema_decay_exits_1_naming_the_key(cub, tmp_path, opts, message):
    result = h.run_cli(["--cfg", CFG, "--data-path", cub, "--output", str(tmp_path), "--opts",
                        *TINY_RUN, *opts])
    assert result.returncode == 1 and message in result.stdout
    assert not os.listdir(tmp_path)  # rejected before anything is written


FINETUNE_CFGS = [os.path.join(h.ROOT, "configs", "finetune", f"MG-SSAF-{v}-CUB-448.yaml")
                 for v in "TSB"]


@pytest.mark.parametrize("path", FINETUNE_CFGS, ids=["T", "S", "B"])
def test_finetune_configs_state_the_total_batch_and_no_drop_path(path):
    # The recipe's batch 16, LR 3e-2 and steps per epoch on any number of processes.
    for world_size, accum, per_process in ((1, 1, 16), (2, 1, 8), (4, 1, 4), (8, 1, 2),
                                           (16, 1, 1), (2, 2, 4), (1, 4, 4)):
        config = load_config(path, ["TRAIN.ACCUMULATION_STEPS", str(accum)],
                             world_size=world_size)
        assert config.DATA.TOTAL_BATCH_SIZE == 16
        assert config.DATA.BATCH_SIZE == per_process, (world_size, accum)
        config = config.clone()
        scale_lrs(config, world_size)
        assert config.TRAIN.BASE_LR == pytest.approx(3e-2)
    assert load_config(path).MODEL.DROP_PATH_RATE == 0.0  # stated, not the ImageNet 0.2 / 0.3
    assert load_config(path, ["MODEL.DROP_PATH_RATE", "0.1"]).MODEL.DROP_PATH_RATE == 0.1


def test_total_batch_that_does_not_split_over_the_processes_is_an_error():
    with pytest.raises(ConfigError) as error:
        load_config(CFG, world_size=3)
    assert (f"DATA.TOTAL_BATCH_SIZE 16 ({CFG}) does not split over 3 process(es) x "
            "TRAIN.ACCUMULATION_STEPS 1: use processes x accumulation steps that divide 16, or "
            "give the batch per process with --batch-size") in str(error.value)
    with pytest.raises(ConfigError, match=r"over 4 process\(es\) x TRAIN.ACCUMULATION_STEPS 8"):
        load_config(CFG, ["TRAIN.ACCUMULATION_STEPS", "8"], world_size=4)
    # evaluation trains nothing: any process count, the total split as far as it goes
    assert load_config(CFG, ["EVAL_MODE", "true"], world_size=3).DATA.BATCH_SIZE == 5
    with pytest.raises(ConfigError, match="DATA.TOTAL_BATCH_SIZE \\(--opts\\) must be 0 \\(off\\)"):
        load_config(CFG, ["DATA.TOTAL_BATCH_SIZE", "-16"])


def test_batch_per_process_from_the_command_line_wins_over_the_total(monkeypatch, tmp_path):
    assert load_config(CFG, ["DATA.BATCH_SIZE", "6"], world_size=3).DATA.BATCH_SIZE == 6
    assert load_config(CFG, flags={"DATA.BATCH_SIZE": 2}, world_size=4).DATA.BATCH_SIZE == 2
    # main.py's flag, and the process count from the launcher's environment
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert get_config(parse_option(["--cfg", CFG])).DATA.BATCH_SIZE == 4
    assert get_config(parse_option(["--cfg", CFG, "--batch-size", "32"])).DATA.BATCH_SIZE == 32
    # a config file gives one of the two
    own = tmp_path / "own.yaml"
    own.write_text(f"BASE: ['{CFG}']\nDATA:\n  BATCH_SIZE: 8\n")
    with pytest.raises(ConfigError) as error:
        load_config(str(own))
    assert (f"DATA.BATCH_SIZE 8 ({own}) and DATA.TOTAL_BATCH_SIZE 16 ({CFG}) are both set: a "
            "config file gives one of them") in str(error.value)
    # without a total, DATA.BATCH_SIZE is the batch per process (Swin's rule)
    assert load_config(h.CFG, world_size=4).DATA.BATCH_SIZE == 128
