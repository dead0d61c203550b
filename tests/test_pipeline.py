"""The training / evaluation pipeline through the real command line, on CPU, with a
tiny model on tiny generated ImageFolders; plus the optimizer, schedule and accumulation."""
from __future__ import annotations

import copy
import logging
import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

import helpers as h
from config import ConfigError, get_config, load_config, parse_option
from data.build import DataError, build_loader, build_transform
from data.samplers import ShardSampler
from engine.classification import ClassificationTask
from engine.preemption import Preemption
from engine.task import Amp, Loaders
from engine.trainer import Trainer
from lr_scheduler import build_scheduler, scale_lrs
from models import build_model
from models.checkpoint_io import load_checkpoint_file
from optimizer import build_optimizer
from startup import STOP_SIGNALS
from utils import uses_glibc_malloc

ACC_LINE = re.compile(r"\* Acc@1 ([\d.]+) Acc@5 ([\d.]+) loss ([\d.]+) \((\d+) images: (\d+) top-1 "
                      r"and (\d+) top-5 correct\)")


@pytest.fixture(autouse=True)
def one_thread():
    """In-process model work on one thread (the 2 cores are shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(*opts: str):
    return load_config(h.CFG, [*h.TINY, *opts])


def accuracy_line(output: str) -> tuple[float, ...]:
    matches = ACC_LINE.findall(output)
    assert matches, output[-3000:]
    return tuple(float(v) for v in matches[-1])


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------
@pytest.mark.cli
def test_training_writes_checkpoints_metrics_and_logs(reference, tmp_path_factory):
    names = sorted(os.listdir(reference))
    # KEEP_CHECKPOINTS 2: the two newest epoch checkpoints stay, plus the best one.
    assert [n for n in names if n.endswith(".pth")] == ["ckpt_best.pth", "ckpt_epoch_2.pth",
                                                         "ckpt_epoch_3.pth"]
    assert "log_rank0.txt" in names and "metrics.jsonl" in names
    assert not [n for n in names if n.endswith(".tmp")]

    metrics = h.read_metrics(reference)
    assert sorted(metrics) == [0, 1, 2, 3]
    for epoch, row in metrics.items():
        assert set(row) >= {"epoch", "train_loss", "lr", "val_loss", "acc1", "acc5", "epoch_time",
                            "images_per_sec", "num_updates"}
        assert all(math.isfinite(row[k]) for k in ("train_loss", "val_loss", "lr"))
        assert row["num_updates"] == 3 * (epoch + 1)  # 15 images, batch 4: the last 3 dropped
        assert 0 <= row["acc1"] <= row["acc5"] <= 100 and row["images_per_sec"] > 0

    with open(os.path.join(reference, "log_rank0.txt"), encoding="utf-8") as f:
        log = f.read()
    assert "full config:" in log and "DATA_PATH:" in log and "KEEP_CHECKPOINTS: 2" in log
    if uses_glibc_malloc():
        assert "glibc malloc keeps freed memory for reuse" in log
    assert re.search(r"Train: \[0/4\]\[0/3\]\teta \S+ lr [\d.]+\t wd [\d.]+\t"
                     r"time [\d.]+ \([\d.]+\)\tloss [\d.]+ \([\d.]+\)\t"
                     r"grad_norm [\d.]+ \([\d.]+\)\tloss_scale [\d.]+ \([\d.]+\)\t"
                     r"mem \d+MB", log)
    console = h.reference_log(str(tmp_path_factory.getbasetemp()))
    assert "Train: [3/4][2/3]" in console and "Max accuracy" in console

    ckpt = load_checkpoint_file(os.path.join(reference, "ckpt_epoch_3.pth"))
    assert set(ckpt) >= {"model", "optimizer", "lr_scheduler", "scaler", "epoch", "max_accuracy",
                         "config", "world_size", "epoch_step", "num_updates"}
    assert ckpt["epoch"] == 3 and ckpt["epoch_step"] is None and ckpt["num_updates"] == 12
    assert ckpt["config"].MODEL.NAME == h.MODEL_NAME and ckpt["config"].TRAIN.EPOCHS == 4


@pytest.mark.cli
def test_second_invocation_auto_resumes_at_next_epoch(reference, data, tmp_path):
    folder = h.copy_run(reference, str(tmp_path), "continued")
    result = h.run_cli(h.main_args(data, str(tmp_path), "continued", *h.REFERENCE_OPTS,
                                   "TRAIN.EPOCHS", "5"))
    assert result.returncode == 0, result.stdout[-3000:]
    assert f"resumed from {os.path.join(folder, 'ckpt_epoch_3.pth')}: epoch 4" in result.stdout
    assert "Train: [4/5][0/3]" in result.stdout
    assert not re.search(r"Train: \[[0-3]/5\]", result.stdout)  # nothing trained twice
    metrics = h.read_metrics(folder)
    assert sorted(metrics) == [0, 1, 2, 3, 4] and metrics[4]["num_updates"] == 15
    assert os.path.exists(os.path.join(folder, "ckpt_epoch_4.pth"))


@pytest.mark.cli
def test_eval_resume_counts_equal_a_plain_loop(reference, data, tmp_path):
    ckpt_path = os.path.join(reference, "ckpt_epoch_3.pth")
    result = h.run_cli(h.main_args(data, str(tmp_path), "eval",
                                   flags=("--eval", "--resume", ckpt_path)))
    assert result.returncode == 0, result.stdout[-3000:]
    acc1, acc5, loss, images, top1, top5 = accuracy_line(result.stdout)
    assert images == 9 and "Accuracy of the network on the 9 test images" in result.stdout

    config = tiny_config("DATA.DATA_PATH", data)
    model = build_model(config)
    model.load_state_dict(load_checkpoint_file(ckpt_path)["model"])
    model.eval()
    transform = build_transform(False, config)
    val = os.path.join(data, "val")
    counts = [0, 0, 0]
    losses = []
    for label, name in enumerate(sorted(os.listdir(val))):
        for file in sorted(os.listdir(os.path.join(val, name))):
            x = transform(Image.open(os.path.join(val, name, file)).convert("RGB"))[None]
            with torch.no_grad():
                logits = model(x)
            top = logits.topk(3, dim=1).indices[0].tolist()
            counts[0] += 1
            counts[1] += top[0] == label
            counts[2] += label in top
            losses.append(torch.nn.functional.cross_entropy(logits, torch.tensor([label])).item())
    assert (images, top1, top5) == tuple(counts)
    assert acc1 == pytest.approx(100 * counts[1] / 9, abs=1e-3)
    assert loss == pytest.approx(sum(losses) / 9, abs=1e-3)


@pytest.mark.cli
def test_torchrun_two_processes_train_and_evaluate_as_users_run_them(data, tmp_path):
    # The defaults users get: augmentation and Mixup/CutMix on, AMP as configured (float16), loader
    # workers on; 2 micro-batches per optimizer step, 2 epochs: 4 optimizer steps.
    opts = [*h.without(h.TINY, "AMP_ENABLE", "DATA.NUM_WORKERS"), "DATA.NUM_WORKERS", "1"]

    def argv(tag: str, *extra: str, flags: tuple[str, ...] = ()) -> list[str]:
        return ["--cfg", h.CFG, "--data-path", data, "--output", str(tmp_path), "--tag", tag,
                "--batch-size", "2", *flags, "--opts", *opts, *extra]

    result = h.run_cli(argv("ddp", "TRAIN.EPOCHS", "2", "TRAIN.ACCUMULATION_STEPS", "2"),
                       prefix=h.torchrun())
    assert result.returncode == 0, result.stdout[-4000:]
    folder = h.run_dir(str(tmp_path), "ddp")
    logs = h.rank_logs(folder)
    for rank, log in enumerate(logs):
        assert f"rank {rank} of 2" in log
        assert "AMP_ENABLE: true" in log and "NUM_WORKERS: 1" in log and "MIXUP: 0.8" in log
        assert ("total batch 8 (2 per process x 2 process(es) x 2 accumulation step(s)): LR "
                "0.003125, 4 optimizer steps (2 epochs of 2)") in log
        # 15 images over 2 ranks (padded to 8 each), batch 2: 4 loader steps a rank and epoch
        assert "Train: [1/2][3/4]" in log and "Train: [1/2][4/" not in log
        # PRINT_FREQ 1: the first micro-batch of an epoch comes before its first update
        assert re.search(r"Train: \[1/2\]\[0/4\].*grad_norm - \(-\)\tloss_scale - \(-\)", log)
        assert re.search(r"Train: \[1/2\]\[1/4\].*grad_norm [\d.]+ \([\d.]+\)\tloss_scale "
                         r"[\d.]+ \(", log)
    # parameters laid out as their gradients: DDP copies no gradient into its buckets
    assert "Grad strides do not match bucket view strides" not in result.stdout
    metrics = h.read_metrics(folder)
    assert [row["num_updates"] for row in metrics.values()] == [2, 4]
    assert "rank 0 of 2" in result.stdout and "rank 1 of 2" not in result.stdout  # console: rank 0
    _, _, _, images, top1, top5 = accuracy_line(logs[0])
    assert images == 9  # 5 + 4: every image once, no padding duplicates
    ckpt = load_checkpoint_file(os.path.join(folder, "ckpt_epoch_1.pth"))
    assert ckpt["num_updates"] == 4 and ckpt["world_size"] == 2
    assert ckpt["max_accuracy"] == max(row["acc1"] for row in metrics.values())

    # --eval of that checkpoint on 2 processes with workers: each rank its slice (5 and 4 images
    # in batches of 2), the accuracy recorded for the checkpoint's epoch.
    path = os.path.join(folder, "ckpt_epoch_1.pth")
    evaluated = h.run_cli(argv("eval", flags=("--eval", "--resume", path)), prefix=h.torchrun())
    assert evaluated.returncode == 0, evaluated.stdout[-4000:]
    eval_logs = h.rank_logs(h.run_dir(str(tmp_path), "eval"))
    assert "Test: [2/3]" in eval_logs[0] and "Test: [1/2]" in eval_logs[1]
    assert "Test: [3/" not in eval_logs[0] and "Test: [2/" not in eval_logs[1]
    for log in eval_logs:
        assert f"evaluating the weights of {path}" in log and "NUM_WORKERS: 1" in log
    acc1, _, _, *counts = accuracy_line(evaluated.stdout)
    assert acc1 == round(metrics[1]["acc1"], 3) and tuple(counts) == (images, top1, top5)

    # The same checkpoint evaluated by one process gives the same counts.
    single = h.run_cli(argv("single", flags=("--eval", "--resume", path)))
    assert single.returncode == 0, single.stdout[-3000:]
    assert accuracy_line(single.stdout)[3:] == (images, top1, top5)


@pytest.mark.cli
def test_pretrained_loads_weights_and_reinitialises_a_head_of_another_size(reference, data,
                                                                            tmp_path):
    ckpt = load_checkpoint_file(os.path.join(reference, "ckpt_epoch_3.pth"))
    ckpt["model"]["head.weight"] = ckpt["model"]["head.weight"][:2]  # as if trained on 2 classes
    ckpt["model"]["head.bias"] = ckpt["model"]["head.bias"][:2]
    path = str(tmp_path / "two_classes.pth")
    torch.save(ckpt, path)
    result = h.run_cli(h.main_args(data, str(tmp_path), "finetune", "TRAIN.EPOCHS", "1", *h.NO_AUG,
                                   flags=("--pretrained", path)))
    assert result.returncode == 0, result.stdout[-3000:]
    assert ("head.weight has shape (2, 64), the model (3, 64): the head starts from its "
            "initialisation") in result.stdout
    assert f"loaded pretrained weights from {path}" in result.stdout
    assert "training from scratch" in result.stdout and "Train: [0/1][0/3]" in result.stdout
    metrics = h.read_metrics(h.run_dir(str(tmp_path), "finetune"))
    assert metrics[0]["num_updates"] == 3  # a fresh start, not a resume


@pytest.mark.cli
def test_torch_distributed_launch_one_process(data, tmp_path):
    launcher = ("-m", "torch.distributed.launch", "--nproc_per_node", "1",
                "--master_port", str(h.free_port()), "main.py")
    result = h.run_cli(h.main_args(data, str(tmp_path), "launch", "TRAIN.EPOCHS", "1", *h.NO_AUG),
                       prefix=launcher)
    assert result.returncode == 0, result.stdout[-4000:]
    assert "rank 0 of 1" in result.stdout and "Train: [0/1][2/3]" in result.stdout
    assert os.path.exists(os.path.join(h.run_dir(str(tmp_path), "launch"), "ckpt_epoch_0.pth"))


@pytest.mark.cli
def test_throughput_mode_times_30_forward_passes_and_trains_nothing(data, tmp_path):
    start = time.monotonic()
    result = h.run_cli(h.main_args(data, str(tmp_path), "speed",
                                   flags=("--throughput", "--disable_amp")))
    wall = time.monotonic() - start
    assert result.returncode == 0, result.stdout[-3000:]
    assert "throughput: 50 warm-up passes, then 30 timed passes of batch size 4" in result.stdout
    match = re.search(r"batch_size 4 throughput ([\d.]+) images/s", result.stdout)
    timed = 30 * 4 / float(match.group(1))  # seconds the 30 timed passes took, by its figure
    assert 0 < timed < wall
    assert "Train:" not in result.stdout
    assert not [f for f in os.listdir(h.run_dir(str(tmp_path), "speed")) if f.endswith(".pth")]


def test_help_explains_every_swin_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_option(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--cfg", "--opts", "--batch-size", "--data-path", "--pretrained", "--resume",
                 "--accumulation-steps", "--use-checkpoint", "--disable_amp", "--output", "--tag",
                 "--eval", "--throughput", "--device", "--local_rank", "--local-rank", "--zip",
                 "--cache-mode", "--amp-opt-level", "--optim", "--fused_window_process",
                 "--fused_layernorm"):
        assert flag in text


def test_flags_map_to_config_keys(monkeypatch, tmp_path):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    args = parse_option(["--cfg", h.CFG, "--batch-size", "32", "--data-path", "/data/in1k",
                         "--pretrained", "p.pth", "--resume", "r.pth", "--accumulation-steps", "4",
                         "--use-checkpoint", "--disable_amp", "--output", str(tmp_path),
                         "--tag", "007",
                         "--eval", "--throughput", "--device", "cpu", "--local-rank=3",
                         "--opts", "TRAIN.EPOCHS", "30", "DATA.BATCH_SIZE", "8"])
    config = get_config(args)
    assert config.DATA.BATCH_SIZE == 32  # flags win over --opts, as in Swin
    assert config.DATA.DATA_PATH == "/data/in1k" and config.TRAIN.EPOCHS == 30
    assert (config.MODEL.PRETRAINED, config.MODEL.RESUME) == ("p.pth", "r.pth")
    assert config.TRAIN.ACCUMULATION_STEPS == 4 and config.TRAIN.USE_CHECKPOINT
    assert not config.AMP_ENABLE and config.EVAL_MODE and config.THROUGHPUT_MODE
    assert config.DEVICE == "cpu" and config.LOCAL_RANK == 3
    assert config.OUTPUT == os.path.join(str(tmp_path), "mg_ssaf_tiny", "007")  # a tag is a string
    monkeypatch.setenv("LOCAL_RANK", "1")  # torchrun's way wins over the flag
    assert get_config(parse_option(["--cfg", h.CFG, "--local_rank", "5"])).LOCAL_RANK == 1


# ------------------------------------------------------------------------------------------------
# Pieces
# ------------------------------------------------------------------------------------------------
def test_validation_shards_cover_every_image_once():
    dataset = list(range(9))
    shards = [list(ShardSampler(dataset, 2, r)) for r in range(2)]
    assert sorted(shards[0] + shards[1]) == dataset and [len(s) for s in shards] == [5, 4]
    assert list(ShardSampler(dataset, 4, 3)) == [3, 7]


def test_dataset_dispatch_on_data_dataset(data):
    _, dataset_val, loader_train, _, _ = build_loader(tiny_config(
        "DATA.DATASET", "digits", "MODEL.NUM_CLASSES", "10", "EVAL_MODE", "true"))
    assert loader_train is None and len(dataset_val) > 0  # eval needs no training set
    assert dataset_val[0][0].shape == (3, 32, 32) and 0 <= dataset_val[0][1] < 10
    with pytest.raises(DataError, match="MODEL.NUM_CLASSES is 3 but the digits dataset has 10"):
        build_loader(tiny_config("DATA.DATASET", "digits"))
    with pytest.raises(DataError, match="DATA.DATASET 'cifar' is unknown"):
        build_loader(tiny_config("DATA.DATASET", "cifar"))
    dataset_train, dataset_val, _, _, mixup_fn = build_loader(tiny_config("DATA.DATA_PATH", data,
                                                                          "DATA.BATCH_SIZE", "4"))
    assert (len(dataset_train), len(dataset_val)) == (15, 9) and mixup_fn is not None


def test_loader_workers_start_from_a_fork_server_with_the_same_batches(data):
    # A fork of the training process while one of its threads (gloo's, NCCL's) takes Python's
    # interpreter lock left a worker deadlocked before its first line (cpython#112275): the run
    # hung. Workers come from a fork server, which gets the datasets pickled; the server and
    # multiprocessing's resource tracker, in the process group too, block the stop signals as the
    # workers do until their init. The training loader's workers start once and serve every
    # epoch.
    def blocked_signals(pid: int) -> set[int]:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            mask = int(next(line for line in f if line.startswith("SigBlk:")).split()[1], 16)
        return {sig for sig in range(1, 65) if mask >> (sig - 1) & 1}

    def epochs(workers: int, split: int) -> tuple[list, list[list[int]]]:
        """The batches of epochs 1 and 2 of loader ``split`` and, per epoch, its workers' pids."""
        loaders = build_loader(tiny_config("DATA.DATA_PATH", data, "DATA.BATCH_SIZE", "4",
                                           "DATA.NUM_WORKERS", str(workers), "AUG.MIXUP", "0",
                                           "AUG.CUTMIX", "0"))
        got, pids = [], []
        for epoch in (1, 2):
            loaders[2].sampler.set_epoch(epoch)
            iterator = iter(loaders[split])
            got.append(next(iterator))
            pids.append([w.pid for w in getattr(getattr(iterator, "iterator", None),
                                                "_workers", [])])
            if workers:
                assert not set(pids[-1]) & set(h.children(os.getpid()))  # not forks of this one
            got += list(iterator)
        return got, pids

    for split in (2, 3):  # training (seeded augmentation), validation
        plain, _ = epochs(0, split)
        with_workers, pids = epochs(2, split)
        assert len(with_workers) == len(plain) > 0
        for (x, y), (x_workers, y_workers) in zip(plain, with_workers):
            assert torch.equal(x, x_workers) and torch.equal(y, y_workers)
        assert len(pids[0]) == 2 and (pids[0] == pids[1]) == (split == 2)
        helpers = {name: [pid for pid in h.children(os.getpid())
                          if name in h.read(f"/proc/{pid}/cmdline", "")]
                   for name in ("forkserver", "resource_tracker")}
        assert len(helpers["forkserver"]) == 1 and len(helpers["resource_tracker"]) == 1
        assert set(STOP_SIGNALS) <= blocked_signals(helpers["forkserver"][0])
        assert signal.SIGUSR1 in blocked_signals(helpers["resource_tracker"][0])  # ignores others


# Builds the training loader with 2 workers, takes a batch, prints "ready" and waits.
LOADER_THEN_WAIT = """
import sys, time
from config import load_config
from data.build import build_loader
loader = build_loader(load_config(sys.argv[1], sys.argv[2:]))[2]
next(iter(loader))
print("ready", flush=True)
time.sleep(600)
"""


def test_loader_workers_end_with_a_training_process_killed_with_9(data):
    # Under the fork server a worker's parent is the server, which lives as long as any worker
    # does: torch's check (the parent changed) would keep them running for ever.
    opts = [*h.TINY, "DATA.DATA_PATH", data, "DATA.BATCH_SIZE", "4", "DATA.NUM_WORKERS", "2"]
    process = subprocess.Popen([sys.executable, "-c", LOADER_THEN_WAIT, h.CFG, *opts], cwd=h.ROOT,
                               env=h.child_env(), stdout=subprocess.PIPE, text=True)
    tree = [process.pid]
    try:
        assert process.stdout.readline() == "ready\n"
        tree = h.descendants(process.pid)
        assert len(tree) >= 4  # itself, the fork server, two workers (and a resource tracker)
        process.kill()
        process.wait()
        assert not h.still_running_after(tree, 20)
    finally:
        for pid in h.running(tree):
            os.kill(pid, signal.SIGKILL)


WATCH_THEN_WAIT = """
import os, sys, threading
from data.build import _exit_with
if sys.argv[1] == "polling":  # as where os has no pidfd_open (macOS, Linux < 5.3)
    del os.pidfd_open
threading.Thread(target=_exit_with, args=(int(sys.argv[2]),), daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"""


@pytest.mark.parametrize("how", ["pidfd", "polling"])
def test_a_worker_ends_once_the_process_it_watches_has_ended(how):
    target = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    watcher = subprocess.Popen([sys.executable, "-c", WATCH_THEN_WAIT, how, str(target.pid)],
                               cwd=h.ROOT, env=h.child_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert watcher.stdout.readline() == "ready\n"
        time.sleep(1.5)
        assert watcher.poll() is None  # watching while the target runs
        target.kill()
        target.wait()  # reaped, as the training process's parent (torchrun, a shell) reaps it
        assert watcher.wait(timeout=15) == 0
    finally:
        for process in (target, watcher):
            if process.poll() is None:
                process.kill()
                process.wait()


def test_transforms_follow_the_aug_and_test_keys():
    train = build_transform(True, tiny_config()).transforms
    assert train[0].scale == (0.08, 1.0) and any("Flip" in type(t).__name__ for t in train)
    assert any("RandAugment" in type(t).__name__ for t in train)
    assert any("RandomErasing" in type(t).__name__ for t in train)
    train = build_transform(True, tiny_config("AUG.SCALE", "[0.5, 1.0]", "AUG.HFLIP", "0.0",
                                              *h.NO_AUG)).transforms
    assert train[0].scale == (0.5, 1.0) and len(train) == 3  # crop, to-tensor, normalise
    resize, crop = build_transform(False, tiny_config("DATA.IMG_SIZE", "224")).transforms[:2]
    assert (resize.size, crop.size) == (256, (224, 224))  # resize 256, center-crop 224


def test_lr_scaling_and_schedules_follow_the_recipe_formulas():
    config = tiny_config("TRAIN.EPOCHS", "10", "TRAIN.WARMUP_EPOCHS", "2", "TRAIN.BASE_LR", "1e-3",
                         "TRAIN.WARMUP_LR", "5e-7", "TRAIN.MIN_LR", "1e-6", "DATA.BATCH_SIZE", "64",
                         "TRAIN.ACCUMULATION_STEPS", "2")
    config = config.clone()
    scale_lrs(config, world_size=2)  # total batch 64 x 2 x 2 = 256: half the LRs of 512
    base, warm, low = 1e-3 * 0.5, 5e-7 * 0.5, 1e-6 * 0.5
    lrs = (config.TRAIN.BASE_LR, config.TRAIN.WARMUP_LR, config.TRAIN.MIN_LR)
    assert lrs == pytest.approx((base, warm, low))

    n = 7  # optimizer steps per epoch
    total, warmup = 10 * n, 2 * n
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=config.TRAIN.BASE_LR)
    scheduler = build_scheduler(config, optimizer, n)
    for t in (0, 1, 5, warmup - 1, warmup, warmup + 3, 40, total - 1, total):
        scheduler.step_update(t)
        if t < warmup:
            expected = warm + (base - warm) * t / warmup
        else:
            progress = (t - warmup) / (total - warmup)
            expected = low + 0.5 * (base - low) * (1 + math.cos(math.pi * progress))
        assert optimizer.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-9), t

    linear_42 = low + (base - low) * (1 - (42 - warmup) / (total - warmup))
    # As in Swin: 'step' decays by DECAY_RATE every DECAY_EPOCHS and 'multistep' by GAMMA at each
    # of MULTISTEPS, counted from step 0 (not from the end of the warm-up).
    for name, t, expected in (("linear", 42, linear_42), ("step", 3 * n - 1, base),
                              ("step", 3 * n, base * 0.1), ("step", 6 * n, base * 0.01),
                              ("multistep", 3 * n - 1, base), ("multistep", 3 * n, base * 0.5),
                              ("multistep", 5 * n - 1, base * 0.5),
                              ("multistep", 5 * n, base * 0.25), ("multistep", 1, None)):
        cfg = config.clone()
        cfg.defrost()
        cfg.TRAIN.LR_SCHEDULER.NAME = name
        cfg.TRAIN.LR_SCHEDULER.DECAY_EPOCHS = 3
        cfg.TRAIN.LR_SCHEDULER.MULTISTEPS = [5, 3]
        cfg.TRAIN.LR_SCHEDULER.GAMMA = 0.5
        expected = warm + (base - warm) * t / warmup if expected is None else expected
        optimizer = torch.optim.AdamW([param], lr=base)
        scheduler = build_scheduler(cfg, optimizer, n)
        scheduler.step_update(t)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-9), name

    bad = config.clone()
    bad.defrost()
    bad.TRAIN.LR_SCHEDULER.NAME = "multistep"
    bad.TRAIN.LR_SCHEDULER.MULTISTEPS = ["a"]
    with pytest.raises(ConfigError, match=r"MULTISTEPS expects a list of epochs"):
        build_scheduler(bad, optimizer, n)


def test_no_decay_group_is_exactly_biases_norms_and_1d_parameters():
    config = tiny_config()
    model = build_model(config)
    optimizer = build_optimizer(config, model)
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = ({names[id(p)] for p in g["params"]} for g in optimizer.param_groups)
    expected = {n for n, p in model.named_parameters() if p.ndim <= 1 or n.endswith(".bias")}
    assert no_decay == expected and decay == set(names.values()) - expected
    assert any(".norm" in n for n in no_decay) and all(".norm" not in n for n in decay)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [config.TRAIN.WEIGHT_DECAY, 0.0]
    assert isinstance(optimizer, torch.optim.AdamW)
    sgd = build_optimizer(tiny_config("TRAIN.OPTIMIZER.NAME", "sgd"), model)
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["nesterov"]
    # Swin's spellings: its build_optimizer lower-cases the name
    assert isinstance(build_optimizer(tiny_config("TRAIN.OPTIMIZER.NAME", "AdamW"), model),
                      torch.optim.AdamW)
    with pytest.raises(ConfigError, match=r"TRAIN.OPTIMIZER.NAME \(--opts\) must be one of "
                                          r"'adamw', 'sgd' \(any case\), got 'lamb'"):
        tiny_config("TRAIN.OPTIMIZER.NAME", "lamb")


def test_accumulating_two_micro_batches_matches_one_double_batch():
    torch.manual_seed(0)
    images, labels = torch.randn(8, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    dataset = TensorDataset(images, labels)
    results = []
    for batch, accum in ((8, 1), (4, 2)):
        config = tiny_config("MODEL.DROP_PATH_RATE", "0.0", "TRAIN.OPTIMIZER.NAME", "sgd",
                             "TRAIN.ACCUMULATION_STEPS", str(accum), "TRAIN.EPOCHS", "1",
                             "TRAIN.WARMUP_EPOCHS", "0", "TRAIN.BASE_LR", "0.05")
        torch.manual_seed(1)
        model = build_model(config)
        initial = copy.deepcopy(model.state_dict())
        loader = DataLoader(dataset, batch_size=batch)
        trainer = Trainer(config, ClassificationTask(), model, Loaders(dataset, loader, dataset,
                                                                       loader),
                          torch.device("cpu"), Amp(False, torch.float32), Preemption(),
                          logging.getLogger("test"))
        trainer.criterion = torch.nn.CrossEntropyLoss()
        trainer.train_one_epoch(0)
        progress = trainer.progress
        assert progress.num_updates == 1 and progress.epoch_step == 8 // batch
        results.append(copy.deepcopy(model.state_dict()))
    for key, value in results[0].items():
        torch.testing.assert_close(results[1][key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert not torch.equal(results[0]["head.weight"], initial["head.weight"])  # the step moved them


@pytest.mark.slow
@pytest.mark.skipif(not uses_glibc_malloc(), reason="tunes glibc's malloc")
def test_keep_freed_memory_stops_per_step_page_faults():
    code = """
import resource, sys, torch
from utils import keep_freed_memory
def step():  # minor page faults of a step: blocks of several sizes alive together, then freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [torch.ones(mb * 2 ** 18) for mb in (64, 8, 32, 8, 16)]
    del blocks
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
if sys.argv[1] == "keep":
    assert keep_freed_memory()
faults = [step() for _ in range(16)]
print(sorted(faults[8:])[4])  # a typical step once the heap has settled (it takes up to 6 steps)
"""
    faults = {}
    for mode in ("default", "keep"):
        result = subprocess.run([sys.executable, "-c", code, mode], cwd=h.ROOT,
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        faults[mode] = int(result.stdout)
    assert faults["keep"] <= max(100, faults["default"] // 10), faults


def test_a_stop_signal_after_an_epoch_saves_its_checkpoint_once_and_marks_it(tmp_path):
    """A signal that arrives after the epoch's last optimizer step (during validation or the
    saves): the epoch checkpoint is written once (no second save moving the first aside), the
    PREEMPTED marker names it and the signal, and the run stops as preempted."""
    from data.samplers import ResumableSampler, SeededSamples
    from engine.preemption import Preempted
    torch.manual_seed(0)
    dataset = TensorDataset(torch.randn(8, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))
    config = tiny_config("TRAIN.EPOCHS", "3", "TRAIN.WARMUP_EPOCHS", "0", "MODEL_EMA", "false",
                         "OUTPUT", str(tmp_path))
    train = DataLoader(SeededSamples(dataset, 0), batch_size=4,
                       sampler=ResumableSampler.one_pass(dataset, 1, 0, 0))
    preemption = Preemption()
    trainer = Trainer(config, ClassificationTask(), build_model(config),
                      Loaders(dataset, DataLoader(dataset, batch_size=4), dataset, train),
                      torch.device("cpu"), Amp(False, torch.float32), preemption,
                      logging.getLogger("test"))
    epoch_or_stop = trainer.train_epoch_or_stop

    def signal_after_the_epoch(epoch: int) -> None:
        epoch_or_stop(epoch)
        preemption.signal_name = "SIGTERM"  # as the handler does
    trainer.train_epoch_or_stop = signal_after_the_epoch
    with pytest.raises(Preempted, match="stopped after epoch 0"):
        trainer.fit()
    assert sorted(os.listdir(tmp_path)) == ["PREEMPTED", "ckpt_best.pth", "ckpt_epoch_0.pth",
                                            "metrics.jsonl"]
    marker = h.read_marker(str(tmp_path))
    assert marker["checkpoint"] == os.path.join(str(tmp_path), "ckpt_epoch_0.pth")
    assert (marker["signal"], marker["step"]) == ("SIGTERM", "end")
    preemption.signal_name = None  # the stop came from another rank's signal: the marker says so
    with pytest.raises(Preempted, match="a signal on another rank received: stopped after epoch"):
        trainer.stop(0, None, saved=True)
    assert h.read_marker(str(tmp_path))["signal"] == "on another rank"


@pytest.mark.parametrize("native", [True, False])
def test_bfloat16_amp_on_a_cpu_without_bfloat16_instructions_warns(monkeypatch, caplog, native):
    """On AVX2-only CPUs bf16 autocast is no faster than float32 (the convolutions run through
    float32, other bf16 products on generic code): the run says so and how to train in float32;
    where oneDNN has bf16, nothing is said."""
    import engine.run

    monkeypatch.setattr(engine.run, "cpu_bfloat16_native", lambda: native)
    config = load_config(None, ["AMP_DTYPE", "bfloat16"])
    logger = logging.getLogger("test_bf16_warning")
    with caplog.at_level(logging.WARNING, logger="test_bf16_warning"):
        amp = engine.run.amp_settings(config, torch.device("cpu"), logger)
    assert amp == Amp(True, torch.bfloat16)
    assert ("without the instructions oneDNN runs bfloat16 on" in caplog.text) is not native
    assert ("--disable_amp" in caplog.text) is not native
