"""main_seg.py through its command line: training by iterations with checkpoints,
metrics.jsonl and auto-resume on an ADE20K-layout folder, torchrun x2 validation counts, bad
data, the iteration schedule's checks and the digits demo."""
import os
import re
import shutil
import signal

import numpy as np
import pytest
import torch
from PIL import Image

import helpers as h
from data.samplers import ResumableSampler

SEG_CFG = h.SEG_DEMO_CFG
NAME = "upernet_seg_test"  # a custom MODEL.NAME: the tiny architecture below is ours
TINY_SEG = ["MODEL.NAME", NAME, "DATA.DATASET", "ade20k", "MODEL.NUM_CLASSES", "150",
            "MODEL.MGSSAF.EMBED_DIM", "16", "MODEL.MGSSAF.DEPTHS", "[1, 1, 1, 1]",
            "SEG.CHANNELS", "16", "SEG.AUX_CHANNELS", "8", "SEG.CROP_SIZE", "[64, 64]",
            "SEG.SCALE", "[96, 64]", "SEG.WARMUP_ITERS", "1", "PRINT_FREQ", "1",
            "DETERMINISTIC", "true"]
VAL_IMAGES = 3  # odd: two ranks evaluate 2 and 1


@pytest.fixture(scope="module")
def ade(tmp_path_factory):
    """ADEChallengeData2016 layout: 4 training and 3 validation 96x64 JPEG + PNG pairs whose
    labels are 0 (ignored) on the left quarter and 1..150 elsewhere."""
    return h.make_ade20k(str(tmp_path_factory.mktemp("ADEChallengeData2016")), (4, VAL_IMAGES))


def seg_args(data: str, output: str, tag: str, *opts: str, flags: tuple[str, ...] = ()) -> list:
    return ["--cfg", SEG_CFG, "--data-path", data, "--output", output, "--tag", tag,
            "--batch-size", "2", *flags, "--opts", *TINY_SEG, *opts]


def run_seg(argv: list, prefix: tuple = ("main_seg.py",)):
    return h.run_cli(argv, prefix=prefix)


@pytest.mark.cli
def test_training_writes_checkpoints_metrics_and_auto_resumes(ade, tmp_path):
    result = run_seg(seg_args(ade, str(tmp_path), "t", "SEG.ITERS", "4", "SEG.EVAL_INTERVAL", "2"))
    assert result.returncode == 0, result.stdout[-4000:]
    folder = os.path.join(str(tmp_path), NAME, "t")
    assert {"ckpt_epoch_0.pth", "ckpt_epoch_1.pth", "ckpt_best.pth"} <= set(os.listdir(folder))
    rows = h.read_metrics(folder)
    assert sorted(rows) == [0, 1] and rows[1]["num_updates"] == 4  # 2 iterations per epoch
    assert all(0 <= rows[e][k] <= 100 for e in rows for k in ("aAcc", "mAcc", "mIoU"))
    assert "Train: [0/2][1/2]" in result.stdout and f"over {VAL_IMAGES} images" in result.stdout
    final = torch.load(os.path.join(folder, "ckpt_epoch_1.pth"), weights_only=False)["model"]

    # --eval --resume loads the whole segmentor and prints the last epoch's mIoU; ms+flip runs.
    for mode in ("whole", "ms_flip"):
        ev = run_seg(seg_args(ade, str(tmp_path), "e", "SEG.TEST_MODE", mode, flags=(
            "--eval", "--resume", os.path.join(folder, "ckpt_epoch_1.pth"))))
        assert ev.returncode == 0, ev.stdout[-3000:]
        assert f"over {VAL_IMAGES} images" in ev.stdout
        assert mode != "whole" or f"* mIoU {rows[1]['mIoU']:.2f} " in ev.stdout

    # tools/seg_overlay.py draws [image | ground truth | prediction] from the checkpoint; an
    # unreadable image is an error naming it
    images = [os.path.join(ade, "images", "validation", f"ADE_validation_0000000{k}.jpg")
              for k in (0, 1)]
    labels = [p.replace("images", "annotations").replace(".jpg", ".png") for p in images]
    overlay = ("tools/seg_overlay.py", "--cfg", SEG_CFG, "--checkpoint",
               os.path.join(folder, "ckpt_epoch_1.pth"), "--out", str(tmp_path / "overlays"))
    drawn = h.run_tool(*overlay, "--images", *images, "--labels", *labels, "--opts", *TINY_SEG)
    assert drawn.returncode == 0, drawn.stderr[-3000:]
    pngs = drawn.stdout.split()
    assert [os.path.basename(p) for p in pngs] == [
        "ADE_validation_00000000_overlay.png", "ADE_validation_00000001_overlay.png"]
    assert Image.open(pngs[0]).size == (3 * 96, 64)
    truncated = str(tmp_path / "truncated.jpg")
    with open(images[0], "rb") as src, open(truncated, "wb") as dst:
        dst.write(src.read()[:300])
    bad = h.run_tool(*overlay, "--images", truncated, "--opts", *TINY_SEG)
    assert bad.returncode == 1 and f"error: cannot read image {truncated}: " in bad.stderr

    # Lose the last epoch: the same command continues at epoch 1 and ends where it ended.
    os.remove(os.path.join(folder, "ckpt_epoch_1.pth"))
    again = run_seg(seg_args(ade, str(tmp_path), "t", "SEG.ITERS", "4", "SEG.EVAL_INTERVAL", "2"))
    assert again.returncode == 0, again.stdout[-4000:]
    assert "epoch 1, step 0, 2 optimizer steps done" in again.stdout
    assert "Train: [0/2]" not in again.stdout
    resumed = torch.load(os.path.join(folder, "ckpt_epoch_1.pth"), weights_only=False)["model"]
    assert all(torch.equal(final[k], resumed[k]) for k in final)  # exact resume


@pytest.mark.cli
def test_shipped_ade20k_config_trains_under_torchrun_in_a_folder_of_its_own(ade, tmp_path):
    """configs/seg/upernet_mg_ssaf_t_512x512_160k_ade20k.yaml as shipped (MG-SSAF-T backbone
    from its BASE, UPerNet at 512 channels, 2 images per process, 4 loader workers, fp32) under
    torchrun x2, with only the iterations and image sizes shrunk: 3 optimizer steps into
    output/upernet_mg_ssaf_tiny_ade20k/<tag>, apart from an ImageNet run's mg_ssaf_tiny."""
    cfg = os.path.join(h.ROOT, "configs", "seg", "upernet_mg_ssaf_t_512x512_160k_ade20k.yaml")
    result = run_seg(["--cfg", cfg, "--data-path", ade, "--output", str(tmp_path), "--tag", "run",
                      "--opts", "SEG.ITERS", "3", "SEG.EVAL_INTERVAL", "3", "SEG.WARMUP_ITERS",
                      "1", "SEG.CROP_SIZE", "[64, 64]", "SEG.SCALE", "[96, 64]", "PRINT_FREQ",
                      "1"], h.torchrun(2, "main_seg.py"))
    assert result.returncode == 0, result.stdout[-4000:]
    assert "rank 0 of 2" in result.stdout and "Train: [0/1][2/3]" in result.stdout
    assert os.listdir(tmp_path) == ["upernet_mg_ssaf_tiny_ade20k"]
    folder = os.path.join(str(tmp_path), "upernet_mg_ssaf_tiny_ade20k", "run")
    assert h.read_metrics(folder)[0]["num_updates"] == 3
    config = torch.load(os.path.join(folder, "ckpt_epoch_0.pth"), weights_only=False)["config"]
    assert (config.MODEL.MGSSAF.EMBED_DIM, config.MODEL.MGSSAF.DEPTHS) == (96, [2, 2, 6, 2])
    assert (config.DATA.NUM_WORKERS, config.DATA.BATCH_SIZE, config.AMP_ENABLE) == (4, 2, False)


def per_class_tables(output: str) -> list[str]:
    """The per-class IoU / Acc tables an output holds (one per evaluation), as logged."""
    return re.findall(r"per-class results:\n(.*?\naAcc [^\n]*)", output, re.DOTALL)


@pytest.mark.cli
def test_torchrun_two_processes_train_with_workers_and_evaluate(ade, tmp_path):
    """main_seg.py under torchrun x2 with loader workers: 3 optimizer steps (DDP checks for
    parameters without gradient from the second on), an evaluation counting every validation
    image once; then --eval of the checkpoint, under torchrun x2 and on one process, reproduces
    the per-class table the run recorded, which an untrained model does not give."""
    def launcher():
        return h.torchrun(2, "main_seg.py")
    # a high LR, so that 3 steps move the predictions away from the untrained model's
    lr = ("TRAIN.BASE_LR", "0.02")
    result = run_seg(seg_args(ade, str(tmp_path), "ddp", "SEG.ITERS", "3", "SEG.EVAL_INTERVAL",
                              "3", "DATA.NUM_WORKERS", "1", *lr), launcher())
    assert result.returncode == 0, result.stdout[-4000:]
    assert "rank 0 of 2" in result.stdout and "Train: [0/1][2/3]" in result.stdout
    assert f"over {VAL_IMAGES} images" in result.stdout  # 2 + 1, no duplicates
    folder = os.path.join(str(tmp_path), NAME, "ddp")
    row = h.read_metrics(folder)[0]
    assert row["num_updates"] == 3
    [trained] = per_class_tables(result.stdout)

    checkpoint = ("--eval", "--resume", os.path.join(folder, "ckpt_epoch_0.pth"))
    ev = run_seg(seg_args(ade, str(tmp_path), "ddp_eval", "DATA.NUM_WORKERS", "1",
                          flags=checkpoint), launcher())
    assert ev.returncode == 0, ev.stdout[-4000:]
    assert "rank 0 of 2" in ev.stdout and f"over {VAL_IMAGES} images" in ev.stdout
    assert f"* mIoU {row['mIoU']:.2f} " in ev.stdout
    assert per_class_tables(ev.stdout) == [trained]
    # One process sees every image itself: the ranks' totals were summed, class by class.
    single = run_seg(seg_args(ade, str(tmp_path), "one_eval", flags=checkpoint))
    assert single.returncode == 0, single.stdout[-4000:]
    assert per_class_tables(single.stdout) == [trained]
    untrained = run_seg(seg_args(ade, str(tmp_path), "untrained", flags=("--eval",)))
    assert untrained.returncode == 0, untrained.stdout[-4000:]
    assert per_class_tables(untrained.stdout) != [trained]
    assert ("evaluating a randomly initialised model: no --resume, no --pretrained, no "
            "checkpoint in ") in untrained.stdout


@pytest.mark.cli
def test_missing_or_mismatched_annotation_is_an_error_naming_the_file(ade, tmp_path):
    broken = str(tmp_path / "ade")
    shutil.copytree(ade, broken)
    missing = os.path.join(broken, "annotations", "validation", "ADE_validation_00000001.png")
    os.remove(missing)
    result = run_seg(seg_args(broken, str(tmp_path), "m", flags=("--eval",)))
    assert result.returncode == 1, result.stdout[-3000:]
    assert f"has no annotation {missing}" in result.stdout and "Traceback" not in result.stdout

    wrong = os.path.join(broken, "annotations", "validation", "ADE_validation_00000000.png")
    Image.fromarray(np.ones((10, 20), np.uint8)).save(wrong)  # not the image's 96x64
    result = run_seg(seg_args(broken, str(tmp_path), "w", flags=("--eval",)))
    assert result.returncode == 1, result.stdout[-3000:]
    assert f"annotation {wrong} is 20x10 but image" in result.stdout


@pytest.mark.cli
def test_skip_bad_images_skips_unreadable_files_with_workers_and_counts_them(ade, tmp_path):
    """DATA.SKIP_BAD_IMAGES in main_seg.py: a truncated training image and a truncated
    validation annotation are each replaced by the next item, named in a warning, and the
    training skip is counted at the epoch's end; loader workers on. Without it the run stops
    naming the file."""
    broken = str(tmp_path / "ade")
    shutil.copytree(ade, broken)
    image = os.path.join(broken, "images", "training", "ADE_training_00000002.jpg")
    ann = os.path.join(broken, "annotations", "validation", "ADE_validation_00000001.png")
    for path in (image, ann):
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    # 2 steps of batch 2: a permutation of the 4 training images, each drawn once
    opts = ("SEG.ITERS", "2", "SEG.EVAL_INTERVAL", "2", "DATA.NUM_WORKERS", "2")
    result = run_seg(seg_args(broken, str(tmp_path), "skip", *opts, "DATA.SKIP_BAD_IMAGES", "true"))
    assert result.returncode == 0, result.stdout[-4000:]
    assert f"cannot read image {image}: " in result.stdout
    assert f"ADE20K: cannot read annotation {ann}: " in result.stdout
    assert result.stdout.count("skipped (DATA.SKIP_BAD_IMAGES)") == 2
    assert "epoch 0: 1 unreadable training image(s) skipped" in result.stdout
    assert f"over {VAL_IMAGES} images" in result.stdout  # the next image stands in

    stop = run_seg(seg_args(broken, str(tmp_path), "stop", *opts))
    assert stop.returncode == 1, stop.stdout[-3000:]
    assert f"cannot read image {image}: " in stop.stdout


@pytest.mark.cli
@pytest.mark.parametrize("mode", ["whole", "ms_flip"])
def test_throughput_times_the_eval_inference_of_a_validation_image(ade, tmp_path, mode):
    # validation images of 80x53: sides the inference pads to multiples of 32
    result = run_seg(seg_args(ade, str(tmp_path), "speed", "SEG.TEST_MODE", mode, "SEG.SCALE",
                              "[80, 53]", flags=("--throughput",)))
    assert result.returncode == 0, result.stdout[-3000:]
    assert "throughput: 50 warm-up passes, then 30 timed passes of batch size 1" in result.stdout
    assert re.search(r"batch_size 1 throughput [\d.]+ images/s", result.stdout)
    assert not [f for f in os.listdir(os.path.join(str(tmp_path), NAME, "speed"))
                if f.endswith(".pth")]


@pytest.mark.cli
def test_iters_must_be_a_multiple_of_the_eval_interval(ade, tmp_path):
    result = run_seg(seg_args(ade, str(tmp_path), "c", "SEG.ITERS", "5", "SEG.EVAL_INTERVAL",
                              "2"))
    assert result.returncode == 1
    assert "SEG.ITERS (5) must be a positive multiple of SEG.EVAL_INTERVAL (2)" in result.stdout


def test_resumable_sampler_covers_ranks_and_resumes_part_way():
    data = list(range(5))
    shards = [list(ResumableSampler(data, 6, 2, r, seed=0)) for r in range(2)]
    positions = sorted(p for s in shards for _, p, _ in s)
    assert positions == list(range(12))  # every draw of the epoch once, two passes and a bit
    indices = [i for _, _, i in sorted((k for s in shards for k in s), key=lambda k: k[1])]
    assert sorted(indices[:5]) == data and sorted(indices[5:10]) == data
    sampler = ResumableSampler(data, 6, 2, 1, seed=0)
    sampler.set_epoch(0, 4)
    assert list(sampler) == shards[1][4:] and len(sampler) == 2


@pytest.mark.cli
def test_digits_demo_command_runs_one_short_epoch(tmp_path):
    result = h.run_cli(["--cfg", h.SEG_DEMO_CFG, "--output", str(tmp_path), "--opts", "SEG.ITERS",
                        "2", "SEG.EVAL_INTERVAL", "2", "SEG.WARMUP_ITERS", "1"],
                       prefix=("main_seg.py",))
    assert result.returncode == 0, result.stdout[-4000:]
    assert re.search(r"\* mIoU [\d.]+ mAcc [\d.]+ aAcc [\d.]+ loss [\d.]+ over 360 images",
                     result.stdout)
    folder = os.path.join(str(tmp_path), "mg_ssaf_nano_digits_seg", "default")
    row = h.read_metrics(folder)[0]
    assert row["num_updates"] == 2 and "mIoU" in row
    plot = h.run_cli([folder], prefix=(os.path.join("tools", "plot_metrics.py"),))
    assert plot.returncode == 0, plot.stdout  # the mIoU panel of a segmentation run
    assert os.path.isfile(os.path.join(folder, "metrics.png"))


@pytest.mark.cli
def test_pretrained_imagenet_weights_go_into_the_backbone(ade, tmp_path):
    from models.mg_ssaf import MGSSAF
    classifier = MGSSAF(img_size=64, num_classes=10, embed_dim=16, depths=[1, 1, 1, 1],
                        num_heads=[1, 4, 4, 4], global_ratio=[0.0, 0.75, 0.75, 0.0],
                        strip_width=[0, 2, 2, 0], window_size=7, mlp_ratio=2.0,
                        head_hidden_dim=128)
    path = str(tmp_path / "imagenet.pth")
    torch.save({"model": classifier.state_dict()}, path)
    result = run_seg(seg_args(ade, str(tmp_path), "p", "SEG.ITERS", "1", "SEG.EVAL_INTERVAL", "1",
                              flags=("--pretrained", path)))
    assert result.returncode == 0, result.stdout[-3000:]
    assert (f"loaded the backbone from {path}; new in the backbone (initialised here): "
            "norm0.bias, norm0.weight, norm1.bias") in result.stdout
    assert "not used: norm.weight, norm.bias, " in result.stdout
    assert "head.weight" in result.stdout and f"over {VAL_IMAGES} images" in result.stdout
    # --eval of backbone weights would evaluate decode heads at their initialisation
    result = run_seg(seg_args(ade, str(tmp_path), "pe", flags=("--eval", "--pretrained", path)))
    assert result.returncode == 1 and (
        f"--eval --pretrained {path}: --pretrained gives the backbone ImageNet weights for "
        "training (the decode heads would be evaluated at their initialisation); evaluate a "
        "main_seg.py checkpoint with --eval --resume") in result.stdout, result.stdout[-3000:]
    assert "over 3 images" not in result.stdout

    # a whole segmentation model, and another width: one short line each
    torch.save({"model": {"decode_head.conv_seg.weight": torch.zeros(2, 2, 1, 1)}},
               str(tmp_path / "seg.pth"))
    for name, width, depths in (("wider.pth", 32, [1, 1, 1, 1]), ("deeper.pth", 16, [1, 2, 1, 1])):
        other = MGSSAF(img_size=64, num_classes=10, embed_dim=width, depths=depths,
                       num_heads=[1, 4, 4, 4], global_ratio=[0.0, 0.75, 0.75, 0.0],
                       strip_width=[0, 2, 2, 0], window_size=7, mlp_ratio=2.0,
                       head_hidden_dim=128)
        torch.save({"model": other.state_dict()}, str(tmp_path / name))
    fits = "the checkpoint does not fit the MG-SSAF backbone: "
    for name, message in (("seg.pth", "it holds a whole segmentation model (UPerNet, "
                                      "main_seg.py), where --pretrained takes an ImageNet"),
                          ("wider.pth", fits + "embedding width (MODEL.MGSSAF.EMBED_DIM): 32 in "
                                        "the checkpoint, 16 in this model"),
                          ("deeper.pth", fits + "blocks in stage 1 (layers.1): 2 in the "
                                         "checkpoint, 1 in this model")):
        result = run_seg(seg_args(ade, str(tmp_path), "p", flags=(
            "--throughput", "--pretrained", str(tmp_path / name))))
        assert result.returncode == 1 and message in result.stdout, result.stdout[-3000:]
        line = next(x for x in result.stdout.splitlines() if message in x)
        assert len(line) < 700, line


@pytest.mark.cli
def test_preempted_run_resumes_mid_epoch_exactly(ade, tmp_path):
    opts = ("SEG.ITERS", "16", "SEG.EVAL_INTERVAL", "8")
    reference = run_seg(seg_args(ade, str(tmp_path), "ref", *opts))
    assert reference.returncode == 0, reference.stdout[-3000:]
    folder = os.path.join(str(tmp_path), NAME, "pre")
    code = h.interrupt(seg_args(ade, str(tmp_path), "pre", *opts), folder, str(tmp_path / "pre.log"),
                     ("main_seg.py",), signal.SIGTERM, to_group=True)
    assert code == 75, open(tmp_path / "pre.log").read()[-3000:]
    [saved] = [n for n in os.listdir(folder) if re.fullmatch(r"ckpt_epoch_0_step_\d+\.pth", n)]
    step = int(re.search(r"step_(\d+)", saved).group(1))
    resumed = run_seg(seg_args(ade, str(tmp_path), "pre", *opts))
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert f"resumed from {os.path.join(folder, saved)}: epoch 0, step {step}," in resumed.stdout
    assert h.step_lines(resumed.stdout)[0] == (0, step)  # the iterations done are not redone
    final, ref = (torch.load(os.path.join(str(tmp_path), NAME, tag, "ckpt_epoch_1.pth"),
                             weights_only=False)["model"] for tag in ("pre", "ref"))
    assert all(torch.equal(final[k], ref[k]) for k in ref)  # same draws, same augmentations
