"""Crash-safe resume, preemption, safe checkpoint loading and clear errors, through the real
command line on CPU with a tiny model on tiny generated ImageFolders."""
from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import sys
import time

import pytest
import torch

import helpers as h
from config import load_config
from engine.checkpoint import prune_checkpoints
from engine.preemption import Preemption
from models.checkpoint_io import CheckpointError, load_checkpoint_file, weight_differences
from startup import STOP_SIGNALS
from utils import atomic_save

# python -c wrappers around main.main that inject a fault; argv follows as for main.py.
NAN_FROM_SECOND_STEP = """
import sys, main, engine.classification as task
build = task.build_criterion
def build_criterion(config, mixup_active):
    criterion, calls = build(config, mixup_active), [0]
    def loss_turning_nan(outputs, targets):
        calls[0] += 1
        loss = criterion(outputs, targets)
        return loss * float("nan") if calls[0] > 1 else loss
    return loss_turning_nan
task.build_criterion = build_criterion
sys.exit(main.main(sys.argv[1:]))
"""
RANK_1_HANGS = """
import os, sys, time, main
from engine.trainer import Trainer
train = Trainer.train_one_epoch
def train_one_epoch(*args, **kwargs):
    if os.environ["RANK"] == "1":
        time.sleep(600)
    return train(*args, **kwargs)
Trainer.train_one_epoch = train_one_epoch
sys.exit(main.main(sys.argv[1:]))
"""
RANK_1_RAISES = """
import os, sys, main
from engine.trainer import Trainer
train = Trainer.train_one_epoch
def train_one_epoch(*args, **kwargs):
    if os.environ["RANK"] == "1":
        raise ValueError("injected on rank 1")
    return train(*args, **kwargs)
Trainer.train_one_epoch = train_one_epoch
sys.exit(main.main(sys.argv[1:]))
"""


@pytest.fixture(scope="session")
def bad_image_data(tmp_path_factory) -> str:
    """The tiny ImageFolder with train/class0/0.png truncated to half its bytes."""
    root = h.make_imagefolder(str(tmp_path_factory.mktemp("bad_image_data")))
    path = os.path.join(root, "train", "class0", "0.png")
    with open(path, "rb") as f:
        head = f.read()
    with open(path, "wb") as f:
        f.write(head[:len(head) // 2])
    return root


# ------------------------------------------------------------------------------------------------
# Resume
# ------------------------------------------------------------------------------------------------
@pytest.mark.cli
def test_kill_9_after_second_epoch_then_auto_resume_matches_uninterrupted_run(reference, data,
                                                                              tmp_path):
    argv = h.main_args(data, str(tmp_path), "killed", *h.REFERENCE_OPTS)
    folder = h.run_dir(str(tmp_path), "killed")
    process = h.start(argv, str(tmp_path / "killed.log"))
    h.wait_for(lambda: os.path.exists(os.path.join(folder, "ckpt_epoch_1.pth")), process)
    process.kill()  # SIGKILL: no handler runs
    assert process.wait() == -signal.SIGKILL

    resumed = h.run_cli(argv)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    saved = int(re.search(r"resumed from \S+ckpt_epoch_([12])\.pth", resumed.stdout).group(1))
    assert h.step_lines(resumed.stdout)[0] == (saved + 1, 0)  # the epochs saved are not redone
    expected, got = h.read_metrics(reference), h.read_metrics(folder)
    assert sorted(got) == [0, 1, 2, 3]
    for epoch in (2, 3):
        for key in ("train_loss", "lr", "val_loss", "acc1", "acc5", "num_updates"):
            assert got[epoch][key] == expected[epoch][key], (epoch, key)
    final, ref = (load_checkpoint_file(os.path.join(f, "ckpt_epoch_3.pth"))["model"]
                  for f in (folder, reference))
    assert all(torch.equal(final[k], ref[k]) for k in ref)


@pytest.mark.cli
def test_sigterm_saves_a_mid_epoch_checkpoint_and_resume_completes_the_steps(data, tmp_path):
    # Batch 1 and 2 micro-batches per step: 15 loader steps and 8 optimizer steps per epoch.
    argv = h.main_args(data, str(tmp_path), "preempted", "TRAIN.EPOCHS", "2",
                       "TRAIN.ACCUMULATION_STEPS", "2", *h.NO_AUG, batch_size=1)
    folder = h.run_dir(str(tmp_path), "preempted")
    process = h.start(argv, str(tmp_path / "preempted.log"))
    h.wait_for_line(os.path.join(folder, "log_rank0.txt"), "Train: [0/2][4/15]", process)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 75
    output = h.read(str(tmp_path / "preempted.log"))
    assert "preempted: SIGTERM received: stopped at epoch 0 step" in output
    mid = [n for n in os.listdir(folder) if re.fullmatch(r"ckpt_epoch_0_step_\d+\.pth", n)]
    assert len(mid) == 1, os.listdir(folder)
    step = int(re.search(r"step_(\d+)", mid[0]).group(1))
    assert 4 < step < 15 and step % 2 == 0  # stopped at an optimizer-step boundary
    assert not os.path.exists(os.path.join(folder, "metrics.jsonl"))

    resumed = h.run_cli(argv)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert f"resumed from {os.path.join(folder, mid[0])}: epoch 0, step {step}," in resumed.stdout
    assert f"Train: [0/2][{step}/15]" in resumed.stdout
    assert f"Train: [0/2][{step - 1}/15]" not in resumed.stdout
    metrics = h.read_metrics(folder)
    assert metrics[0]["num_updates"] == 8 and metrics[1]["num_updates"] == 16  # as uninterrupted
    assert not os.path.exists(os.path.join(folder, mid[0]))  # superseded once epoch 0 was saved


def test_sigterm_sigusr1_and_sigint_request_a_stop():
    saved = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    try:
        for sig in saved:
            preemption = Preemption()
            preemption.install()
            assert not preemption.requested
            os.kill(os.getpid(), sig)
            assert preemption.requested and preemption.signal_name == sig.name
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def test_a_failed_save_leaves_the_previous_checkpoint_and_no_partial_file(tmp_path):
    path = str(tmp_path / "ckpt_epoch_0.pth")
    atomic_save({"model": {"w": torch.ones(2)}}, path)
    with pytest.raises(Exception):
        atomic_save({"model": {"w": torch.zeros(2)}, "bad": lambda: None}, path)  # not picklable
    assert torch.equal(load_checkpoint_file(path)["model"]["w"], torch.ones(2))
    assert os.listdir(tmp_path) == ["ckpt_epoch_0.pth"]


def test_pruning_keeps_the_newest_epochs_the_best_and_later_runs_files(tmp_path):
    names = [f"ckpt_epoch_{e}.pth" for e in range(6)] + ["ckpt_epoch_2_step_3.pth",
                                                          "ckpt_epoch_7.pth", "ckpt_best.pth"]
    for name in names:
        atomic_save({"model": {}}, str(tmp_path / name))
    prune_checkpoints(str(tmp_path), epoch=5, keep=2, logger=logging.getLogger("test"))
    assert sorted(os.listdir(tmp_path)) == ["ckpt_best.pth", "ckpt_epoch_4.pth", "ckpt_epoch_5.pth",
                                            "ckpt_epoch_7.pth"]


@pytest.mark.cli
def test_truncated_newest_checkpoint_is_skipped_with_a_warning_and_kept(reference, data, tmp_path):
    folder = h.copy_run(reference, str(tmp_path), "truncated")
    newest = os.path.join(folder, "ckpt_epoch_3.pth")
    size = os.path.getsize(newest) // 2
    os.truncate(newest, size)
    result = h.run_cli(h.main_args(data, str(tmp_path), "truncated", flags=("--eval",)))
    assert result.returncode == 0, result.stdout[-3000:]
    assert f"auto-resume skips {newest}: cannot be read (truncated or corrupt?)" in result.stdout
    assert f"evaluating the weights of {os.path.join(folder, 'ckpt_epoch_2.pth')}" in result.stdout
    assert os.path.getsize(newest) == size


@pytest.mark.cli
def test_training_over_a_skipped_checkpoint_keeps_it(reference, data, tmp_path):
    folder = h.copy_run(reference, str(tmp_path), "retrain")
    newest = os.path.join(folder, "ckpt_epoch_3.pth")
    os.truncate(newest, os.path.getsize(newest) // 2)
    with open(newest, "rb") as f:
        corrupt = f.read()
    result = h.run_cli(h.main_args(data, str(tmp_path), "retrain", *h.REFERENCE_OPTS))
    assert result.returncode == 0, result.stdout[-3000:]
    assert "resumed from " + os.path.join(folder, "ckpt_epoch_2.pth") in result.stdout
    kept = [n for n in os.listdir(folder) if n.startswith("ckpt_epoch_3.pth.replaced-")]
    assert len(kept) == 1 and f"kept as {os.path.join(folder, kept[0])}" in result.stdout
    with open(os.path.join(folder, kept[0]), "rb") as f:
        assert f.read() == corrupt
    assert load_checkpoint_file(newest)["epoch"] == 3


# ------------------------------------------------------------------------------------------------
# Safe loading
# ------------------------------------------------------------------------------------------------
@pytest.mark.cli
def test_checkpoint_that_would_run_code_is_refused(data, tmp_path):
    marker = str(tmp_path / "pwned")
    for i, zipped in enumerate((True, False)):
        path = h.evil_checkpoint(str(tmp_path / f"evil{i}.pth"), marker, zipped)
        with pytest.raises(CheckpointError, match="refused to load"):
            load_checkpoint_file(path)
        assert not os.path.exists(marker)

    result = h.run_cli(h.main_args(data, str(tmp_path), "evil", flags=("--eval", "--resume", path)))
    assert result.returncode == 1
    assert f"{path}: refused to load" in result.stdout and "Traceback" not in result.stdout
    assert not os.path.exists(marker)


def released_keys(reference_dir: str, variant: str) -> dict[str, torch.Tensor]:
    """MG-SSAF-{variant}.keys.txt as a state dict of shape-only (meta) tensors."""
    weights = {}
    with open(os.path.join(reference_dir, f"MG-SSAF-{variant}.keys.txt"), encoding="utf-8") as f:
        for line in f:
            name, shape = line.split()
            weights[name] = torch.empty([int(n) for n in shape.split("x")], device="meta")
    return weights


def test_released_s_weights_into_t_are_refused_naming_the_depths_not_listing_keys(reference_dir):
    s, t = (released_keys(reference_dir, v) for v in "ST")
    assert weight_differences(s, t) == [
        "blocks in stage 2 (layers.2): 18 in the checkpoint, 6 in this model",
        "an MG-SSAF-S checkpoint into an MG-SSAF-T model?"]
    b = released_keys(reference_dir, "B")
    assert weight_differences(b, t)[:2] == [
        "embedding width (MODEL.MGSSAF.EMBED_DIM): 128 in the checkpoint, 96 in this model",
        "blocks in stage 2 (layers.2): 18 in the checkpoint, 6 in this model"]


def test_segmentation_weights_into_a_classifier_are_refused_naming_both_networks(reference_dir):
    """A UPerNet checkpoint (main_seg.py: backbone.*, decode_head.*) where a classifier is built,
    and the other way round (e.g. a run folder both entry points wrote to)."""
    t = released_keys(reference_dir, "T")
    seg = {f"backbone.{k}": v for k, v in t.items() if not k.startswith("head.")}
    seg["decode_head.conv_seg.weight"] = torch.empty(150, 512, 1, 1, device="meta")
    assert weight_differences(seg, t) == [
        "it holds a segmentation model (UPerNet, main_seg.py), this model is a classifier "
        "(main.py)"]
    assert weight_differences(t, seg) == [
        "it holds a classifier (main.py), this model is a segmentation model (UPerNet, "
        "main_seg.py)"]
    s = released_keys(reference_dir, "S")  # segmentation models compare by their backbones
    seg_s = {f"backbone.{k}": v for k, v in s.items() if not k.startswith("head.")}
    assert weight_differences({**seg_s, "decode_head.conv_seg.weight": None}, seg) == [
        "blocks in stage 2 (layers.2): 18 in the checkpoint, 6 in this model",
        "an MG-SSAF-S checkpoint into an MG-SSAF-T model?"]


@pytest.mark.cli
def test_released_layout_checkpoint_with_a_yacs_config_loads(reference, data, tmp_path):
    weights = dict(load_checkpoint_file(os.path.join(reference, "ckpt_epoch_3.pth"))["model"])
    for key in [k for k in weights if k.endswith("attn.proj_qkv.weight")]:  # released extra norm
        dim = weights[key].shape[1]
        weights[key.replace("proj_qkv.weight", "norm.weight")] = torch.ones(dim)
        weights[key.replace("proj_qkv.weight", "norm.bias")] = torch.zeros(dim)
    config = load_config(h.CFG, h.TINY)  # a frozen yacs CfgNode, pickled as released files hold it
    path = str(tmp_path / "released.pth")
    torch.save({"model": weights, "config": config, "epoch": 299, "max_accuracy": 81.9}, path)

    loaded = load_checkpoint_file(path)
    assert loaded["config"].MODEL.MGSSAF.EMBED_DIM == 24 and loaded["epoch"] == 299
    result = h.run_cli(h.main_args(data, str(tmp_path), "released",
                                   flags=("--eval", "--resume", path)))
    assert result.returncode == 0, result.stdout[-3000:]
    assert f"evaluating the weights of {path}" in result.stdout and " * Acc@1 " in result.stdout


# ------------------------------------------------------------------------------------------------
# Clear errors, nothing overwritten
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def victim(reference, tmp_path_factory) -> tuple[str, dict]:
    """A copy of the reference run that every bad invocation below points at, and its digests."""
    output = str(tmp_path_factory.mktemp("victim"))
    folder = h.copy_run(reference, output, "victim")
    return folder, h.digests(folder)


@pytest.fixture(scope="module")
def other_class_count_checkpoint(reference, tmp_path_factory) -> str:
    ckpt = load_checkpoint_file(os.path.join(reference, "ckpt_epoch_3.pth"))
    ckpt["model"]["head.weight"] = ckpt["model"]["head.weight"][:2]
    ckpt["model"]["head.bias"] = ckpt["model"]["head.bias"][:2]
    path = str(tmp_path_factory.mktemp("two_classes") / "two_classes.pth")
    torch.save(ckpt, path)
    return path


def _layout(tmp: str, kind: str, data: str) -> str:
    """A broken copy of the dataset at ``tmp``."""
    root = os.path.join(tmp, kind)
    if kind == "empty":
        os.makedirs(root)
        return root
    shutil.copytree(data, root)
    if kind in ("no_val", "no_train"):
        shutil.rmtree(os.path.join(root, "val" if kind == "no_val" else "train"))
    if kind == "missing_val_class":
        shutil.rmtree(os.path.join(root, "val", "class2"))
    if kind == "empty_class":
        for name in os.listdir(os.path.join(root, "train", "class1")):
            os.remove(os.path.join(root, "train", "class1", name))
    return root


# (id, how to break the run, what the message must say); TRAIN.EPOCHS 5 lets a run that got past
# its checks resume from the victim's epoch 3 and write epoch 4. untouched: not a byte of the run
# folder changes (logs and metrics included).
BAD_INPUTS = [
    ("no_data_path", dict(data=""), ["DATA.DATA_PATH (--data-path) is not set"]),
    ("missing_data_path", dict(data="/nonexistent/imagenet"),
     ["/nonexistent/imagenet is not a folder"]),
    ("empty_data_path", dict(layout="empty"), ["empty is empty: expected train/ and val/"]),
    ("no_val", dict(layout="no_val"), ["no_val/val not found"]),
    ("no_train", dict(layout="no_train"), ["no_train/train not found"]),
    ("empty_class_folder", dict(layout="empty_class"), ["empty_class/train", "class1"]),
    ("num_classes", dict(opts=["MODEL.NUM_CLASSES", "5"], untouched=True),
     ["MODEL.NUM_CLASSES is 5 but", "/val has 3 classes"]),
    ("bad_image", dict(layout="bad_image", batch_size=5, opts=h.NO_AUG),
     ["cannot read image", "train/class0/0.png"]),
    ("unknown_key", dict(opts=["TRAIN.EPOCH", "3"]), ["unknown config key TRAIN.EPOCH"]),
    ("mistyped_value", dict(opts=["TRAIN.EPOCHS", "five"]),
     ["TRAIN.EPOCHS expects an integer", "five"]),
    ("missing_resume", dict(flags=("--resume", "/nonexistent/ckpt.pth")),
     ["MODEL.RESUME (--resume) /nonexistent/ckpt.pth: file not found"]),
    ("missing_val_class", dict(layout="missing_val_class"),
     ["MODEL.NUM_CLASSES is 3 but", "/val has 2 classes: missing ['class2'], which",
      "missing_val_class/train has"]),
    ("other_variant", dict(flags=("--eval", "--resume", "VICTIM/ckpt_epoch_3.pth"),
                           opts=["MODEL.MGSSAF.EMBED_DIM", "48"]),
     ["ckpt_epoch_3.pth: its weights do not fit this model (it was saved by a run of MODEL.NAME "
      f"{h.MODEL_NAME}, NUM_CLASSES 3): embedding width (MODEL.MGSSAF.EMBED_DIM): 24 in the "
      "checkpoint, 48 in this model"]),
    ("other_depth_pretrained", dict(flags=("--eval", "--pretrained", "VICTIM/ckpt_epoch_3.pth"),
                                    opts=["MODEL.MGSSAF.DEPTHS", "[1,1,2,1]"]),
     ["ckpt_epoch_3.pth: its weights do not fit this model (it was saved by a run of MODEL.NAME "
      f"{h.MODEL_NAME}, NUM_CLASSES 3): blocks in stage 2 (layers.2): 1 in the checkpoint, 2 in "
      "this model"]),
    ("other_class_count", dict(flags=("--eval", "--resume", "TWO_CLASSES")),
     ["two_classes.pth: its weights do not fit this model",
      "classes (MODEL.NUM_CLASSES): 2 in the checkpoint, 3 in this model"]),
    ("not_a_checkpoint", dict(flags=("--eval", "--resume", "TEXT_FILE")),
     ["notes.txt: not a checkpoint (not a torch.save file: it starts with b'some'"]),
    ("batch_size_0", dict(early=True, batch_size=0),
     ["DATA.BATCH_SIZE (--batch-size) must be at least 1, got 0"]),
    ("odd_batch_with_cutmix",
     dict(batch_size=3, opts=[*h.NO_AUG, "AUG.CUTMIX_MINMAX", "[0.2, 0.8]"]),
     ["Mixup/CutMix", "needs an even DATA.BATCH_SIZE, got 3"]),
    ("unwritable_output", dict(output="FILE/runs"), ["output folder", "cannot be written"]),
    # config values: each named (key, where it was set, value, what is allowed) before any work
    ("base_include_cycle", dict(early=True, flags=("--cfg", "CYCLE")),
     ["BASE include cycle: ", "/a.yaml -> ", "/b.yaml -> ", "/c.yaml -> ", "/a.yaml: a config file "
      "cannot include itself"]),
    ("deeply_nested_opts", dict(early=True, opts=["DATA.IMG_SIZE", "[" * 5000 + "]" * 5000]),
     ["--opts: the value of DATA.IMG_SIZE is nested too deeply: '[[[["]),
    ("interpolation", dict(early=True, opts=["DATA.INTERPOLATION", "foo"]),
     ["DATA.INTERPOLATION (--opts) must be one of 'bicubic', 'bilinear', ", "got 'foo'"]),
    ("base_lr_nan", dict(early=True, opts=["TRAIN.BASE_LR", "nan"]),
     ["TRAIN.BASE_LR (--opts) must be a finite number >= 0, got nan"]),
    ("base_lr_negative", dict(early=True, opts=["TRAIN.BASE_LR", "-1"]),
     ["TRAIN.BASE_LR (--opts) must be a finite number >= 0, got -1.0"]),
    ("img_size_0", dict(early=True, opts=["DATA.IMG_SIZE", "0"]),
     ["DATA.IMG_SIZE (--opts) must be a multiple of 32 (the network's stride), got 0"]),
    ("img_size_48", dict(early=True, opts=["DATA.IMG_SIZE", "48"]),
     ["DATA.IMG_SIZE (--opts) must be a multiple of 32 (the network's stride), got 48"]),
    ("reprob", dict(early=True, opts=["AUG.REPROB", "2.0"]),
     ["AUG.REPROB (--opts) must be in [0, 1], got 2.0"]),
    ("label_smoothing", dict(early=True, opts=["MODEL.LABEL_SMOOTHING", "1.5"]),
     ["MODEL.LABEL_SMOOTHING (--opts) must be in [0, 1), got 1.5"]),
]


@pytest.mark.cli
@pytest.mark.parametrize("case, change, messages", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_fails_clearly_and_leaves_checkpoints_alone(
        case, change, messages, victim, data, bad_image_data, other_class_count_checkpoint,
        tmp_path):
    folder, before = victim
    output = os.path.dirname(os.path.dirname(folder))
    if change.get("output"):
        (tmp_path / "FILE").write_text("a file, not a folder")
        output = str(tmp_path / change["output"])
    dataset = change.get("data", data)
    if change.get("layout") == "bad_image":
        dataset = bad_image_data
    elif change.get("layout"):
        dataset = _layout(str(tmp_path), change["layout"], data)
    (tmp_path / "notes.txt").write_text("some notes, not a checkpoint")
    for name, base in (("a", "b"), ("b", "c"), ("c", "a")):  # a BASE include cycle
        (tmp_path / f"{name}.yaml").write_text(f"BASE: [{base}.yaml]\n")
    flags = tuple(f.replace("VICTIM", folder).replace("TWO_CLASSES", other_class_count_checkpoint)
                  .replace("TEXT_FILE", str(tmp_path / "notes.txt"))
                  .replace("CYCLE", str(tmp_path / "a.yaml"))
                  for f in change.get("flags", ()))
    argv = h.main_args(dataset, output, "victim", *h.REFERENCE_OPTS, "TRAIN.EPOCHS", "5",
                       *change.get("opts", []), flags=flags, batch_size=change.get("batch_size", 4))
    files = h.folder_bytes(folder)
    result = h.run_cli(argv)
    assert result.returncode == 1, result.stdout[-3000:]
    for message in messages:
        assert message in result.stdout, result.stdout[-3000:]
    error = [line for line in result.stdout.splitlines() if "ERROR" in line or "error:" in line]
    assert error and len(error[-1]) < 600, error  # one line that says it, no key lists
    assert "Traceback" not in result.stdout, result.stdout[-3000:]
    if change.get("early"):  # refused before the run's logger (and anything else) started
        assert " INFO " not in result.stdout, result.stdout[-3000:]
    assert h.digests(folder) == before
    assert not os.path.exists(os.path.join(folder, "ckpt_epoch_4.pth"))
    if change.get("untouched"):
        assert h.folder_bytes(folder) == files


@pytest.fixture(scope="session")
def unreadable_class0(tmp_path_factory) -> dict[str, str]:
    """For "train" and "val": the tiny ImageFolder with that split's class0 images replaced by
    empty files and text files, so that the first batches meet one."""
    roots = {}
    for split in ("train", "val"):
        root = h.make_imagefolder(str(tmp_path_factory.mktemp(f"unreadable_{split}")))
        folder = os.path.join(root, split, "class0")
        for i, name in enumerate(sorted(os.listdir(folder))):
            with open(os.path.join(folder, name), "w") as f:
                f.write("" if i % 2 else "a text file, not an image")
        roots[split] = root
    return roots


@pytest.mark.cli
@pytest.mark.parametrize("split", ["train", "val"])
@pytest.mark.parametrize("processes", [1, 2])
def test_an_unreadable_image_in_a_loader_worker_ends_the_run_at_once(
        split, processes, reference, unreadable_class0, tmp_path):
    """With loader workers, an exception in a worker ends the run (every rank) with exit code 1
    and the file named, instead of the main process waiting forever at exit for workers that
    ignore SIGTERM."""
    folder = h.copy_run(reference, str(tmp_path), "bad")
    before, metrics = h.digests(folder), h.read(os.path.join(folder, "metrics.jsonl"))
    prefix = ("main.py",) if processes == 1 else h.torchrun()
    argv = h.main_args(unreadable_class0[split], str(tmp_path), "bad", *h.REFERENCE_OPTS,
                       "TRAIN.EPOCHS", "5", "DATA.NUM_WORKERS", "2")
    began = time.time()
    code, output = h.run_cli_or_kill(argv, prefix)
    assert code == 1, f"exit code {code} after {time.time() - began:.0f} s:\n{output[-3000:]}"
    assert re.search(rf"(ERROR|error:) .*cannot read image \S+/{split}/class0/\d+\.png", output), \
        output[-3000:]
    assert h.digests(folder) == before
    assert h.read(os.path.join(folder, "metrics.jsonl")) == metrics
    assert not os.path.exists(os.path.join(folder, "PREEMPTED"))


@pytest.mark.cli
def test_a_rank_that_fails_on_its_own_is_named_by_its_peer(bad_image_data, tmp_path):
    # One rank reads the bad image and fails; its peer, whose collective breaks, names that
    # rank and its error rather than blaming a rank that "died or hung", and keeps gloo's
    # traceback in its log file.
    argv = h.main_args(bad_image_data, str(tmp_path), "one_fails", "DATA.NUM_WORKERS", "1",
                       *h.NO_AUG, batch_size=2)
    result = h.run_cli(argv, prefix=h.torchrun())
    assert result.returncode != 0, result.stdout[-3000:]
    logs = h.rank_logs(h.run_dir(str(tmp_path), "one_fails"))
    failed = [r for r, log in enumerate(logs) if "train/class0/0.png" in log
              and f"rank {1 - r} failed" not in log]
    assert len(failed) == 1, result.stdout[-4000:]
    peer = 1 - failed[0]
    assert re.search(rf"rank {failed[0]} failed: (\S+: )?cannot read image \S+train/class0/0\.png",
                     logs[peer]), logs[peer][-3000:]
    assert "died or hung" not in result.stdout + logs[peer]
    assert "a failure, not a preemption (no PREEMPTED marker)" in logs[peer]
    if peer == 0:  # the broken collective's traceback is in the log file, not on the console
        assert "engine/trainer.py" in logs[0], logs[0][-3000:]
        assert "engine/trainer.py" not in result.stdout, result.stdout[-4000:]


@pytest.mark.cli
def test_a_run_that_fails_before_writing_anything_leaves_no_folder(data, tmp_path):
    only_val = tmp_path / "only_val"
    shutil.copytree(os.path.join(data, "val"), only_val / "val")
    output = tmp_path / "output"
    result = h.run_cli(h.main_args(str(only_val), str(output), "nothing"))
    assert result.returncode == 1 and "only_val/train not found" in result.stdout
    assert not output.exists(), list(output.rglob("*"))
    os.makedirs(output / "kept")  # folders that were there stay
    result = h.run_cli(h.main_args(str(only_val), str(output / "kept"), "nothing"))
    assert result.returncode == 1 and os.listdir(output / "kept") == []


@pytest.mark.cli
def test_an_unexpected_error_of_one_rank_is_named_by_its_peer(data, tmp_path):
    argv = h.main_args(data, str(tmp_path), "raises", "TRAIN.EPOCHS", "1", *h.NO_AUG,
                       batch_size=2)
    result = h.run_cli(argv, prefix=(*h.torchrun()[:-1], "--no-python", sys.executable,
                                          "-c", RANK_1_RAISES))
    assert result.returncode != 0, result.stdout[-3000:]
    rank0, rank1 = h.rank_logs(h.run_dir(str(tmp_path), "raises"))
    assert "rank 1 failed: ValueError: injected on rank 1" in rank0, rank0[-3000:]
    assert "Traceback" in rank1 and "This rank failed; the others stop" in rank1, rank1[-3000:]
    assert "[rank 1] error: ValueError: injected on rank 1" in result.stdout  # its stderr
    # rank 0's broken collective: its traceback in its log file, not on the console
    assert "engine/trainer.py" in rank0 and "engine/trainer.py" not in result.stdout


@pytest.mark.cli
@pytest.mark.parametrize("workers", [0, 2])
def test_skip_bad_images_warns_and_counts(workers, bad_image_data, tmp_path):
    result = h.run_cli(h.main_args(bad_image_data, str(tmp_path), "skip", "TRAIN.EPOCHS", "1",
                                   "DATA.SKIP_BAD_IMAGES", "true", "DATA.NUM_WORKERS",
                                   str(workers), *h.NO_AUG, batch_size=5))
    assert result.returncode == 0, result.stdout[-3000:]
    assert re.search(r"WARNING cannot read image \S+train/class0/0\.png: .*skipped "
                     r"\(DATA\.SKIP_BAD_IMAGES\)", result.stdout)
    assert "epoch 0: 1 unreadable training image(s) skipped" in result.stdout


@pytest.mark.cli
def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(reference, data, tmp_path):
    folder = h.copy_run(reference, str(tmp_path), "nan")
    before = h.digests(folder)
    argv = h.main_args(data, str(tmp_path), "nan", *h.REFERENCE_OPTS, "TRAIN.EPOCHS", "6")
    result = h.run_cli(argv, prefix=("-c", NAN_FROM_SECOND_STEP))
    assert result.returncode == 1, result.stdout[-3000:]
    assert "training loss is nan at epoch 4 step 1/3" in result.stdout
    assert h.digests(folder) == before and len(h.read_metrics(folder)) == 4


@pytest.mark.cli
def test_a_stuck_rank_makes_the_others_stop_after_dist_timeout(data, tmp_path):
    argv = h.main_args(data, str(tmp_path), "stuck", "TRAIN.EPOCHS", "1", "DIST_TIMEOUT", "5",
                       *h.NO_AUG, batch_size=2)
    env = dict(WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(h.free_port()))
    ranks = [h.start(argv, str(tmp_path / f"rank{r}.log"), ("-c", RANK_1_HANGS),
                     env=dict(RANK=str(r), LOCAL_RANK=str(r), **env)) for r in (0, 1)]
    try:
        log = str(tmp_path / "rank0.log")
        h.wait_for_line(log, "Start training", ranks[0])
        began = time.time()
        assert ranks[0].wait(timeout=120) == 1
        assert time.time() - began < 60
    finally:
        ranks[1].kill()
        ranks[1].wait()
    output = h.read(log)
    assert "another rank failed or did not answer within DIST_TIMEOUT (5 s)" in output, \
        output[-3000:]
