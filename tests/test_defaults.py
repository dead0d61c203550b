"""The defaults users get: the path they run (the shipped recipe's augmentation and AMP, through
the CLI, on photo-sized JPEGs), TRAIN.START_EPOCH, variant names, Swin's flags and keys, --eval
--pretrained under auto-resume, None in --opts, lower bounds of requirements."""
from __future__ import annotations

import copy
import math
import os
import re
from importlib.metadata import version

import pytest
import torch
from packaging.requirements import Requirement
from PIL import Image, ImageOps
from timm.data.auto_augment import RandAugment

import helpers as h
from config import load_config
from data.build import build_transform, posterize
from models import build_model

ROOT = h.ROOT
ACC_LINE = re.compile(r"\* Acc@1 .*")


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> str:
    """An ImageFolder of 3 classes x (8 train + 2 val) JPEGs of 500x375 and 333x500."""
    return h.make_jpeg_folder(str(tmp_path_factory.mktemp("photos")))


def _photo(photos: str) -> Image.Image:
    folder = os.path.join(photos, "train", "n00000000")
    return Image.open(os.path.join(folder, sorted(os.listdir(folder))[0])).convert("RGB")


# ------------------------------------------------------------------------------------------------
# The default augmentation
# ------------------------------------------------------------------------------------------------
def test_default_train_transform_survives_every_randaugment_op_at_top_magnitude(photos):
    """RandAugment's magnitude (m9, mstd 0.5) reaches 10, where PosterizeIncreasing keeps 0 bits:
    Pillow 13 raised there (1 image in ~3,000 through the default transform)."""
    transform = build_transform(True, load_config(h.CFG))
    rand_augment = next(t for t in transform.transforms if isinstance(t, RandAugment))
    image = _photo(photos)
    assert image.size == (500, 375)
    names = []
    for op in list(rand_augment.ops):
        top = copy.copy(op)
        top.prob, top.magnitude, top.magnitude_std = 1.0, 10, 0.0
        rand_augment.ops, rand_augment.num_layers = [top], 1
        out = transform(image)
        assert out.shape == (3, 224, 224) and torch.isfinite(out).all(), op.name
        names.append(op.name)
    assert "PosterizeIncreasing" in names


def test_posterize_keeps_the_behaviour_before_pillow_13(photos):
    image = _photo(photos)
    assert posterize(image, 0).getextrema() == ((0, 0), (0, 0), (0, 0))  # 0 bits: black
    for bits in (1, 4, 7):
        assert posterize(image, bits).tobytes() == ImageOps.posterize(image, bits).tobytes()
    assert posterize(image, 8) is image


@pytest.mark.cli
@pytest.mark.parametrize("amp_dtype", ["float16", "bfloat16"])
def test_shipped_recipe_trains_through_the_cli_on_photos(photos, tmp_path, amp_dtype):
    """configs/MG-SSAF/MG-SSAF-T.yaml as shipped (224 crops of the photos, RandAugment,
    Mixup/CutMix, random erasing, 8 loader workers, AMP float16 with a GradScaler), with only the
    model, the epochs and the batch shrunk; bfloat16 is the other AMP setting, trained by two
    processes under torchrun (3 optimizer steps an epoch)."""
    opts = [*h.TINY_MODEL, "TRAIN.EPOCHS", "2", "TRAIN.WARMUP_EPOCHS", "1"]
    prefix, batch, steps = ("main.py",), "8", 3  # 24 training photos
    if amp_dtype != "float16":
        opts += ["AMP_DTYPE", amp_dtype]
        prefix, batch = h.torchrun(), "4"
    result = h.run_cli(["--cfg", h.CFG, "--data-path", photos, "--output", str(tmp_path),
                        "--tag", amp_dtype, "--batch-size", batch, "--opts", *opts],
                       prefix=prefix, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:]
    folder = h.run_dir(str(tmp_path), amp_dtype)
    with open(os.path.join(folder, "log_rank0.txt"), encoding="utf-8") as f:
        log = f.read()
    for shipped in ("AUTO_AUGMENT: rand-m9-mstd0.5-inc1", "MIXUP: 0.8", "CUTMIX: 1.0",
                    "REPROB: 0.25", "COLOR_JITTER: 0.4", "AMP_ENABLE: true", "NUM_WORKERS: 8",
                    "IMG_SIZE: 224", f"AMP_DTYPE: {amp_dtype}"):
        assert shipped in log, shipped
    metrics = h.read_metrics(folder)
    assert sorted(metrics) == [0, 1]
    assert metrics[1]["num_updates"] == 2 * steps, metrics
    if prefix != ("main.py",):  # both ranks trained the second epoch
        assert all("Train: [1/2]" in rank_log for rank_log in h.rank_logs(folder))
    assert all(math.isfinite(row["train_loss"]) and math.isfinite(row["val_loss"])
               for row in metrics.values())
    if amp_dtype == "float16":  # a GradScaler scales the loss (65536 to start with)
        assert re.search(r"loss_scale 65536\.0000", log) and "AMP_DTYPE float16 on CPU" in log
    else:
        assert "loss_scale 1.0000" in log


# ------------------------------------------------------------------------------------------------
# Settings as a user meets them, through the CLI
# ------------------------------------------------------------------------------------------------
@pytest.mark.cli
def test_start_epoch_places_the_lr_schedule(data, tmp_path):
    """TRAIN.START_EPOCH 2 of 4 without a checkpoint: the schedule starts at epoch 2."""
    result = h.run_cli(h.main_args(data, str(tmp_path), "start", "TRAIN.EPOCHS", "4",
                                   "TRAIN.WARMUP_EPOCHS", "1", "TRAIN.START_EPOCH", "2",
                                   *h.NO_AUG))
    assert result.returncode == 0, result.stdout[-3000:]
    assert "the LR schedule starts at optimizer step 6" in result.stdout
    metrics = h.read_metrics(h.run_dir(str(tmp_path), "start"))
    assert sorted(metrics) == [2, 3]
    n = 3  # 15 images, batch 4, drop_last
    assert [metrics[e]["num_updates"] for e in (2, 3)] == [3 * n, 4 * n]
    scale = 4 / 512
    base, low = 0.2 * scale, 1e-6 * scale
    progress = (3 * n - n) / (4 * n - n)  # cosine after a one-epoch warm-up
    expected = low + 0.5 * (base - low) * (1 + math.cos(math.pi * progress))
    assert metrics[2]["lr"] == pytest.approx(expected, rel=1e-6)
    assert metrics[3]["lr"] == pytest.approx(low, rel=1e-6)  # the cosine reaches MIN_LR


@pytest.mark.cli
def test_start_epoch_out_of_range_is_refused(data, tmp_path):
    result = h.run_cli(h.main_args(data, str(tmp_path), "bad", "TRAIN.EPOCHS", "4",
                                   "TRAIN.START_EPOCH", "4"))
    assert result.returncode == 1 and "Traceback" not in result.stdout
    assert "TRAIN.START_EPOCH must be at least 0 and less than TRAIN.EPOCHS (4), got 4" in (
        result.stdout)


def _model_info(*args: str):
    return h.run_tool("tools/model_info.py", *args, timeout=None)


@pytest.mark.cli
@pytest.mark.parametrize("variant, params", [("T", "19.58"), ("S", "32.52"), ("B", "55.89")])
def test_model_info_on_the_released_repository_configs(reference_dir, variant, params):
    """The released repository's variant files as users bring them (MODEL.NAME MG-SSAF-S, ...)."""
    path = os.path.join(reference_dir, "released-configs", f"MG-SSAF-{variant}.yaml")
    result = _model_info("--cfg", path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"MG-SSAF-{variant}: {params} M parameters")


@pytest.mark.cli
def test_model_info_names_a_variant_whose_architecture_is_overridden():
    result = _model_info("--cfg", "configs/MG-SSAF/MG-SSAF-T.yaml", "--opts", "MODEL.NAME",
                         "mg_ssaf_base")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "MODEL.NAME mg_ssaf_base (--opts) names MG-SSAF-B, but MODEL.MGSSAF.EMBED_DIM is 96" in (
        result.stderr)


@pytest.mark.cli
def test_swin_flags_are_accepted(data, tmp_path):
    """Swin's command line: the flags without effect are named in one warning line."""
    result = h.run_cli(h.main_args(
        data, str(tmp_path), "swin", "TRAIN.EPOCHS", "1", *h.NO_AUG,
        flags=("--zip", "--cache-mode", "part", "--fused_window_process", "--fused_layernorm",
               "--optim", "SGD", "--amp-opt-level", "O0")))  # any case, as in Swin
    assert result.returncode == 0, result.stdout[-3000:]
    warnings = [line for line in result.stdout.splitlines() if "without effect here" in line]
    assert len(warnings) == 1 and warnings[0].endswith(
        "DATA.ZIP_MODE True (--zip), FUSED_WINDOW_PROCESS True (--fused_window_process), "
        "FUSED_LAYERNORM True (--fused_layernorm)")
    ckpt = torch.load(os.path.join(h.run_dir(str(tmp_path), "swin"), "ckpt_epoch_0.pth"),
                      map_location="cpu", weights_only=False)
    assert ckpt["config"].TRAIN.OPTIMIZER.NAME == "SGD"
    assert "momentum_buffer" in next(iter(ckpt["optimizer"]["state"].values()))
    assert ckpt["config"].AMP_OPT_LEVEL == "O0" and not ckpt["config"].AMP_ENABLE


@pytest.mark.cli
def test_eval_pretrained_wins_over_auto_resume(reference, data, tmp_path):
    """The run folder holds checkpoints, yet --eval --pretrained X evaluates X, which must fit
    the model whole."""
    other = build_model(load_config(h.CFG, h.TINY))  # weights unlike the run's
    path = str(tmp_path / "other.pth")
    torch.save({"model": other.state_dict()}, path)
    h.copy_run(reference, str(tmp_path), "run")
    # saved from a DDP-wrapped model: the prefixes go, as for --resume and the tools
    torch.save({"model": {"module." + k: v for k, v in other.state_dict().items()}},
               str(tmp_path / "ddp.pth"))
    pretrained = h.run_cli(h.main_args(data, str(tmp_path), "run",
                                       flags=("--eval", "--pretrained", str(tmp_path / "ddp.pth"))))
    resumed = h.run_cli(h.main_args(data, str(tmp_path), "fresh", flags=("--eval", "--resume",
                                                                          path)))
    for result in (pretrained, resumed):
        assert result.returncode == 0, result.stdout[-3000:]
    assert f"evaluating the weights of {tmp_path / 'ddp.pth'} (--pretrained)" in pretrained.stdout
    assert "ckpt_epoch_3" not in pretrained.stdout
    assert ACC_LINE.findall(pretrained.stdout) == ACC_LINE.findall(resumed.stdout)

    # Evaluated as it is, the file must fit the whole model: a head of another class count (an
    # ImageNet checkpoint on a 3-class folder) is an error, as with --resume, not a random head.
    config = load_config(h.CFG, h.TINY)
    wider = build_model(load_config(h.CFG, [*h.TINY, "MODEL.NUM_CLASSES",
                                            str(config.MODEL.NUM_CLASSES + 2)]))
    torch.save({"model": wider.state_dict()}, path)
    misfit = h.run_cli(h.main_args(data, str(tmp_path), "misfit",
                                   flags=("--eval", "--pretrained", path)))
    assert misfit.returncode == 1, misfit.stdout[-3000:]
    assert (f"classes (MODEL.NUM_CLASSES): {config.MODEL.NUM_CLASSES + 2} in the checkpoint, "
            f"{config.MODEL.NUM_CLASSES} in this model") in misfit.stdout
    assert not ACC_LINE.findall(misfit.stdout)


@pytest.mark.cli
def test_opts_none_means_none(data, tmp_path):
    """``--opts AUG.CUTMIX_MINMAX None`` is None (CutMix from its alpha), as in yacs; a
    malformed value is named."""
    ok = h.run_cli(h.main_args(data, str(tmp_path), "none", "TRAIN.EPOCHS", "1",
                               "AUG.CUTMIX_MINMAX", "None"))
    assert ok.returncode == 0, ok.stdout[-3000:]
    assert "CUTMIX_MINMAX: null" in ok.stdout
    bad = h.run_cli(h.main_args(data, str(tmp_path), "bad", "AUG.CUTMIX_MINMAX", "[0.5]"))
    assert bad.returncode == 1 and "Traceback" not in bad.stdout
    assert "AUG.CUTMIX_MINMAX must be None" in bad.stdout and "got [0.5]" in bad.stdout


def test_requirements_have_lower_bounds_that_hold():
    """An older torch than the code needs (safe_globals with (object, name) pairs: 2.6) is
    not kept by pip; every bound holds for what is installed."""
    with open(os.path.join(ROOT, "requirements.txt"), encoding="utf-8") as f:
        # one requirement a line, comments (whole lines or after one) and blank lines left out;
        # packaging 26 refuses the line's newline
        lines = [line.split("#", 1)[0].strip() for line in f]
    reqs = [Requirement(line) for line in lines if line]
    names = {r.name.lower(): r for r in reqs}
    assert names["torch"].specifier.contains("2.6.0")
    assert not names["torch"].specifier.contains("2.5.1")
    for req in reqs:
        assert str(req.specifier).startswith(">="), req
        assert req.specifier.contains(version(req.name), prereleases=True), (req,
                                                                             version(req.name))
