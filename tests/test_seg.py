"""Segmentation components: UPerNet heads, ADE20K reader and pipelines, inference
helpers, metrics, the digits scenes."""
import logging
import math
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from config import load_config
from data.ade20k import ADE20K, reduce_zero_label
from data.build import DataError
from data.common import BadImageError
from data.digits_seg import NUM_CLASSES as DIGITS_CLASSES, DigitsSegDataset
from data.segmentation import seg_class_names
from data.seg_pipeline import SegTestTransform, SegTrainTransform, item_rng, rescale_size
from models.mg_ssaf import MGSSAF
from models.seg_inference import ms_flip_inference, slide_inference, whole_inference
from models.upernet import FCNHead, UPerHead, UPerNet, build_segmentor
from helpers import ROOT, SEG_DEMO_CFG, make_ade20k
from seg_metrics import SegMetrics, format_table, intersect_and_union, summarize


def _features(embed_dim: int, size: int, batch: int = 2) -> list[torch.Tensor]:
    return [torch.randn(batch, embed_dim * 2 ** i, size // 4 // 2 ** i, size // 4 // 2 ** i)
            for i in range(4)]


def test_heads_map_four_features_to_logits():
    feats = _features(16, 64)
    head = UPerHead([16, 32, 64, 128], num_classes=7, channels=24)
    assert head(feats).shape == (2, 7, 16, 16)
    aux = FCNHead(64, num_classes=7, channels=12)
    assert aux(feats[2]).shape == (2, 7, 4, 4)


class _StubBackbone(nn.Module):
    """Four maps at strides 4/8/16/32 with C..8C channels, as MGSSAFSegBackbone returns."""

    def __init__(self, embed_dim: int = 8) -> None:
        super().__init__()
        self.out_channels = [embed_dim * 2 ** i for i in range(4)]
        self.convs = nn.ModuleList(nn.Conv2d(3, c, 1) for c in self.out_channels)

    def forward(self, x):
        return [conv(nn.functional.avg_pool2d(x, 4 * 2 ** i)) for i, conv in enumerate(self.convs)]


def test_segmentor_upsamples_to_the_input_and_adds_aux_logits_in_training():
    model = UPerNet(_StubBackbone(), num_classes=5, channels=16, aux_channels=8)
    x = torch.randn(2, 3, 64, 96)
    logits, aux = model.train()(x)
    assert logits.shape == aux.shape == (2, 5, 64, 96)
    assert model.eval()(x).shape == (2, 5, 64, 96)


@pytest.mark.parametrize("variant,expected", [("t", 49.7), ("s", 62.7), ("b", 87.8)])
def test_segmentor_params_match_the_paper(variant, expected):
    cfg = load_config(os.path.join(ROOT, f"configs/seg/upernet_mg_ssaf_{variant}_512x512_160k_"
                                         "ade20k.yaml"))
    params = sum(p.numel() for p in build_segmentor(cfg).parameters()) / 1e6
    assert abs(params - expected) / expected < 0.015, params


def test_segmentor_on_the_mg_ssaf_backbone():
    cfg = load_config(SEG_DEMO_CFG)
    model = build_segmentor(cfg).eval()
    assert model(torch.randn(1, 3, 64, 96)).shape == (1, DIGITS_CLASSES, 64, 96)


def test_miou_of_a_known_prediction():
    label = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 0]])
    totals = intersect_and_union(pred, label, num_classes=4)
    # class 0: inter 1, union 3 (pred {0,0 at (1,1)}, label 2 px); class 1: 2/3; class 2: 1/2;
    # class 3: no label -> nan, left out of the means.
    s = summarize(totals)
    assert s["mIoU"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3 * 100)
    assert s["mAcc"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3 * 100)
    assert s["aAcc"] == pytest.approx(4 / 6 * 100)
    assert math.isnan(s["IoU"][3])
    metrics = SegMetrics(4)
    metrics.update(pred[:1], label[:1])
    metrics.update(pred[1:], label[1:])
    assert torch.equal(metrics.totals, totals)
    assert "mIoU 50.00" in format_table(s, ["a", "b", "c", "d"])


def test_metrics_as_mmseg_predicted_but_absent_class_has_iou_zero():
    """mmseg 0.11: IoU = intersection / union (0 for a class predicted but not labelled, nan
    only when the union is 0), Acc = intersection / label area; means over non-nan classes."""
    label = torch.tensor([[0, 0, 1, 1], [0, 1, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 3], [0, 1, 2, 0]])  # 2 and the last 0: on ignored pixels
    s = summarize(intersect_and_union(pred, label, num_classes=4))
    # class 0: inter 2, union 3, label 3; class 1: inter 2, union 4, label 3;
    # class 2: only predicted on an ignored pixel: union 0 -> nan; class 3: predicted once,
    # never labelled: IoU 0 / 1 = 0, Acc 0 / 0 = nan.
    np.testing.assert_allclose(s["IoU"], [200 / 3, 50, np.nan, 0])
    np.testing.assert_allclose(s["Acc"], [200 / 3, 200 / 3, np.nan, np.nan])
    assert s["mIoU"] == pytest.approx((2 / 3 + 1 / 2 + 0) / 3 * 100)  # 38.89, not 58.33
    assert s["mAcc"] == pytest.approx(200 / 3)
    assert s["aAcc"] == pytest.approx(4 / 6 * 100)
    assert "mIoU 38.89" in format_table(s, ["a", "b", "c", "d"])


def test_metrics_of_an_all_ignored_set_are_nan():
    label = torch.full((2, 3), 255)
    s = summarize(intersect_and_union(torch.zeros(2, 3, dtype=torch.long), label, 3))
    assert all(math.isnan(s[k]) for k in ("aAcc", "mAcc", "mIoU"))


def test_label_zero_is_ignored_after_reduce_zero_label():
    raw = np.array([[0, 1], [150, 0]], np.uint8)
    label = torch.from_numpy(reduce_zero_label(raw).astype(np.int64))
    assert label.tolist() == [[255, 0], [149, 255]]
    pred = torch.tensor([[7, 0], [149, 3]])  # wrong only where the label was 0
    assert summarize(intersect_and_union(pred, label, 150))["mIoU"] == 100.0


def test_raw_label_255_stays_ignored_after_reduce_zero_label():
    """mmseg: 0 -> 255, k -> k - 1, then 254 -> 255: a raw 255 stays ignored (not class 254)."""
    raw = np.array([[255, 1, 254, 0]], np.uint8)
    assert reduce_zero_label(raw).tolist() == [[255, 0, 253, 255]]


def _ade_folder(root, sizes=((40, 30), (64, 48))):
    """An ADE20K folder of two pairs a split, of ``sizes`` (width, height), labels 0..150."""
    def draw(rng, i):
        w, h = sizes[i]
        return (rng.integers(0, 255, (h, w, 3), dtype=np.uint8),
                rng.integers(0, 151, (h, w), dtype=np.uint8))

    return make_ade20k(str(root), (len(sizes), len(sizes)), draw)


def test_ade20k_reads_reduced_labels_and_is_reproducible(tmp_path):
    root = _ade_folder(tmp_path)
    train = ADE20K(root, "training", SegTrainTransform((128, 32), (0.5, 2.0), (32, 32)))
    x, y = train[1]
    assert x.shape == (3, 32, 32) and y.shape == (32, 32) and y.dtype == torch.int64
    assert y.max() <= 255 and not ((y > 149) & (y < 255)).any()
    x2, y2 = train[1]
    assert torch.equal(x, x2) and torch.equal(y, y2)  # same (seed, epoch, index)
    train.set_epoch(1)
    assert not torch.equal(train[1][0], x)
    val = ADE20K(root, "validation", SegTestTransform((128, 32)))
    x, y = val[1]
    assert x.shape == (3, 32, 43) and y.shape == (48, 64)


def test_ade20k_names_the_file_of_a_missing_or_mismatched_annotation(tmp_path):
    root = _ade_folder(tmp_path)
    ann = os.path.join(root, "annotations", "training", "ADE_training_00000001.png")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(ann)
    data = ADE20K(root, "training", SegTestTransform((128, 32)))
    with pytest.raises(DataError, match="ADE_training_00000001.png is 10x10 but image .*64x48"):
        data[1]
    os.remove(ann)
    with pytest.raises(DataError, match="has no annotation .*ADE_training_00000001.png"):
        data[1]


def test_ade20k_names_the_annotation_and_values_of_labels_out_of_range(tmp_path):
    """Raw labels 151..254 would reach the loss as classes 150..253 of a 150-class model."""
    root = _ade_folder(tmp_path)
    ann = os.path.join(root, "annotations", "validation", "ADE_validation_00000001.png")
    label = np.full((48, 64), 150, np.uint8)
    label[0, :3], label[1, :2], label[2, 0] = 199, 151, 255  # 255: unlabelled, allowed
    Image.fromarray(label).save(ann)
    data = ADE20K(root, "validation", SegTestTransform((128, 32)))
    with pytest.raises(DataError, match=rf"{re.escape(ann)} has 5 pixel\(s\) of value\(s\) "
                                        r"151, 199: expected 0\.\.150 \(0 = other\) or 255"):
        data[1]
    label[label != 255] = 0
    Image.fromarray(label).save(ann)
    assert set(data[1][1].unique().tolist()) == {255}


def _truncate(path):
    """Keeps the first half of the bytes of ``path`` (a download cut short)."""
    with open(path, "rb") as f:
        head = f.read()
    with open(path, "wb") as f:
        f.write(head[:len(head) // 2])


def test_ade20k_names_an_unreadable_image_or_annotation(tmp_path):
    root = _ade_folder(tmp_path)
    data = ADE20K(root, "validation", SegTestTransform((128, 32)))
    image = os.path.join(root, "images", "validation", "ADE_validation_00000001.jpg")
    _truncate(image)
    with pytest.raises(BadImageError, match=f"cannot read image {re.escape(image)}: .*truncated"):
        data[1]
    ann = os.path.join(root, "annotations", "validation", "ADE_validation_00000000.png")
    _truncate(ann)
    with pytest.raises(BadImageError, match=f"cannot read annotation {re.escape(ann)}: "):
        data[0]


def test_ade20k_with_skip_bad_images_takes_the_next_readable_item_and_counts(tmp_path, caplog):
    root = _ade_folder(tmp_path, sizes=((40, 30), (64, 48), (32, 32)))
    data = ADE20K(root, "validation", SegTestTransform((128, 32)), skip_bad_images=True)
    image = os.path.join(root, "images", "validation", "ADE_validation_00000001.jpg")
    ann = os.path.join(root, "annotations", "validation", "ADE_validation_00000002.png")
    _truncate(image)
    _truncate(ann)
    with caplog.at_level("WARNING", logger="mg_ssaf"):
        assert torch.equal(data[1][1], data[0][1])  # 1 and 2 unreadable: wraps around to 0
    assert f"cannot read image {image}: " in caplog.text
    assert f"cannot read annotation {ann}: " in caplog.text
    assert data.pop_skipped() == 2 and data.pop_skipped() == 0
    # a data error other than an unreadable file is never skipped
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(ann)
    with pytest.raises(DataError, match="is 10x10 but image"):
        data[2]


def _write_class_info(root, rows):
    """``<root>/objectInfo150.txt``: the official header, then ``rows`` (Idx, Name) with made-up
    ratios and counts, tab-separated."""
    lines = ["Idx\tRatio\tTrain\tVal\tName"]
    lines += [f"{idx}\t0.0100\t{100 + k}\t{10 + k}\t{name}" for k, (idx, name) in enumerate(rows)]
    with open(os.path.join(root, "objectInfo150.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def test_ade20k_class_names_come_from_object_info_or_are_numbered(tmp_path, caplog, monkeypatch):
    """The per-class table names ADE20K's classes by the folder's objectInfo150.txt (first name
    of each row), and numbers them where it is absent or malformed."""
    root = _ade_folder(tmp_path)
    cfg = load_config(None, ["DATA.DATASET", "ade20k", "DATA.DATA_PATH", root,
                             "MODEL.NUM_CLASSES", "150"])
    numbered = [str(k) for k in range(150)]
    assert seg_class_names(cfg) == numbered  # no objectInfo150.txt
    # As the official file: names with aliases after commas, an Idx and names ending in spaces.
    rows = [(k, f"thing {k}, alias {k}") for k in range(1, 151)]
    rows[0], rows[1], rows[7], rows[21] = (1, "wall"), (2, "building, edifice"), (8, "bed "), \
        ("22 ", "water")
    _write_class_info(root, rows)
    names = seg_class_names(cfg)
    assert names[:3] == ["wall", "building", "thing 3"] and names[7] == "bed"
    assert names[21] == "water" and names[149] == "thing 150" and len(names) == 150
    table = format_table(summarize(torch.ones(4, 150)), names).splitlines()
    assert table[1].startswith("wall ") and table[2].startswith("building ")
    monkeypatch.setattr(logging.getLogger("mg_ssaf"), "propagate", True)  # off in runs' logger
    for broken, why in [(rows[:149], "149 class rows, expected 150"),
                        (rows[:5] + [(7, "x")] + rows[6:], "row 6 is '7\\t"),
                        (rows[:9] + [(10, " , y")] + rows[10:], "row 10 has no name")]:
        _write_class_info(root, broken)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="mg_ssaf"):
            assert seg_class_names(cfg) == numbered
        assert f"class names not read from {root}/objectInfo150.txt ({why}" in caplog.text
    with open(os.path.join(root, "objectInfo150.txt"), "wb") as f:
        f.write(b"Idx Ratio Train Val Name\n\xff")  # not UTF-8 (nor tab-separated)
    assert seg_class_names(cfg) == numbered


def test_random_crop_respects_cat_max_ratio_and_pads_with_ignore():
    image = Image.fromarray(np.zeros((100, 100, 3), np.uint8))
    seg = np.zeros((100, 100), np.uint8)
    seg[:, 90:] = 1  # class 1 only in a strip: most crops are > 75% class 0
    transform = SegTrainTransform((100, 100), (1.0, 1.0), (20, 20), photometric=False, hflip=0.0)
    hits = [(transform(image, Image.fromarray(seg), item_rng(0, 0, i))[1] == 1).any().item()
            for i in range(20)]
    assert sum(hits) > 10
    small = SegTrainTransform((10, 10), (1.0, 1.0), (16, 16))
    x, y = small(Image.new("RGB", (10, 10)), Image.new("L", (10, 10)), item_rng(0, 0, 0))
    assert x.shape == (3, 16, 16) and (y[10:] == 255).all() and (y[:, 10:] == 255).all()
    assert rescale_size((683, 512), (2048, 512)) == (683, 512)
    assert rescale_size((4000, 1000), (2048, 512)) == (2048, 512)


def test_sliding_window_and_multi_scale_agree_with_whole_for_a_pointwise_model():
    model = nn.Conv2d(3, 4, 1).eval()
    x = torch.randn(1, 3, 64, 96)
    whole = whole_inference(model, x, (64, 96))
    slide = slide_inference(model, x, (64, 96), crop=(32, 32), stride=(21, 21))
    assert torch.allclose(whole, slide, atol=1e-5)
    ms = ms_flip_inference(model, x, (64, 96), ratios=(1.0,), flip=True)
    assert torch.allclose(whole, ms, atol=1e-5)


def test_digits_scenes_are_deterministic_and_use_the_split():
    train, val = DigitsSegDataset(True), DigitsSegDataset(False)
    assert len(train) == 1437 and len(val) == 360
    x, y = val[3]
    assert x.shape == (3, 64, 64) and torch.equal(y, val[3][1])
    assert 0 < (y > 0).float().mean() < 0.5 and int(y.max()) < DIGITS_CLASSES
    assert torch.equal(train[5][1], train[5][1])
    train.set_epoch(1)
    a = train[5][1]
    train.set_epoch(2)
    assert not torch.equal(a, train[5][1])


def test_overlay_palette_is_deterministic_and_distinct():
    from tools.seg_overlay import overlay, palette, panel
    colours = palette(150)
    assert np.array_equal(colours, palette(150)) and len({tuple(c) for c in colours}) == 150
    image = np.full((4, 4, 3), 100, np.uint8)
    label = np.array([[0, 1, 255, 255]] * 4, np.uint8)
    out = overlay(image, label, colours)
    assert (out[:, 2:] == 100).all() and not (out[:, :2] == 100).all()
    assert panel(image, label, label, colours).size == (12, 4)


class _ContextModel(nn.Module):
    """Logits of a 1x1 convolution plus the image's mean and its left-right gradient: what a pixel
    gets depends on the window it is seen in and on flips, so whole, slide and ms+flip differ."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        per_class = torch.tensor([3.0, -3.0, 1.0, 0.0]).view(1, 4, 1, 1)
        ramp = torch.linspace(-1, 1, x.shape[-1]).view(1, 1, 1, -1)
        return self.conv(x) + per_class * (x.mean((1, 2, 3), keepdim=True) * 4 + ramp)


def test_inference_runs_the_function_seg_test_mode_names():
    from models.seg_inference import inference
    opts = ["SEG.SLIDE_CROP", "[32, 32]", "SEG.SLIDE_STRIDE", "[21, 21]", "SEG.MS_RATIOS",
            "[0.5, 1.0]"]
    torch.manual_seed(0)
    model = _ContextModel().eval()
    x = torch.randn(1, 3, 64, 96) + 0.5
    expected = {"whole": whole_inference(model, x, (64, 96)),
                "slide": slide_inference(model, x, (64, 96), crop=(32, 32), stride=(21, 21)),
                "ms_flip": ms_flip_inference(model, x, (64, 96), ratios=(0.5, 1.0))}
    for mode, probs in expected.items():
        got = inference(model, x, (64, 96), load_config(None, ["SEG.TEST_MODE", mode, *opts]).SEG)
        torch.testing.assert_close(got, probs, rtol=0, atol=0, msg=mode)
        others = [m for m in expected if m != mode]
        assert all((probs - expected[m]).abs().max() > 1e-3 for m in others), mode


def _nano_classifier(cfg) -> MGSSAF:
    arch = cfg.MODEL.MGSSAF
    return MGSSAF(img_size=64, num_classes=10, embed_dim=arch.EMBED_DIM, depths=arch.DEPTHS,
                  num_heads=arch.NUM_HEADS, global_ratio=arch.GLOBAL_RATIO,
                  head_hidden_dim=arch.HEAD_HIDDEN_DIM)


def test_imagenet_weights_load_into_the_backbone_without_the_classifier():
    from models.upernet import load_backbone_weights
    cfg = load_config(SEG_DEMO_CFG)
    model = build_segmentor(cfg)
    classifier = _nano_classifier(cfg)
    with torch.no_grad():  # the classifier's final norm: not what the output norms start from
        classifier.norm.weight.fill_(3.0)
    new, unused = load_backbone_weights(model, classifier.state_dict())
    assert new == [f"norm{i}.{p}" for i in range(4) for p in ("bias", "weight")]
    assert sorted(unused) == ["head.bias", "head.weight", "last_conv.bias", "last_conv.weight",
                              "norm.bias", "norm.weight"]
    source = classifier.state_dict()
    own = model.backbone.state_dict()
    assert set(own) - set(source) == set(new)
    assert all(torch.equal(v, source[k]) for k, v in own.items() if k not in new)
    assert all(torch.equal(own[k], torch.ones_like(own[k]) if k.endswith("weight")
                           else torch.zeros_like(own[k])) for k in new)
    del source["layers.0.blocks.0.norm1.weight"]  # anything else missing is an error
    with pytest.raises(RuntimeError, match=re.escape(
            "1 of the model's keys missing (first: layers.0.blocks.0.norm1.weight)")):
        load_backbone_weights(model, source)


def test_seg_backbone_normalises_each_stage_map_with_a_fresh_layernorm():
    """Swin's segmentation backbone: norm0..norm3, nn.LayerNorm(C_i) with eps 1e-5, weight 1,
    bias 0, over the channels of each stage map; no final norm, no classifier."""
    cfg = load_config(SEG_DEMO_CFG)
    backbone = build_segmentor(cfg).backbone
    embed = cfg.MODEL.MGSSAF.EMBED_DIM
    for i in range(4):
        norm = getattr(backbone, f"norm{i}")
        assert isinstance(norm, nn.LayerNorm) and norm.eps == 1e-5
        assert norm.normalized_shape == (embed * 2 ** i,)
        assert torch.equal(norm.weight, torch.ones(embed * 2 ** i))
        assert torch.equal(norm.bias, torch.zeros(embed * 2 ** i))
    names = [n for n, _ in backbone.named_parameters()]
    assert not any(n.startswith(("norm.", "head.", "last_conv.")) for n in names)
    with torch.no_grad():
        for i in range(4):
            getattr(backbone, f"norm{i}").weight.normal_()
            getattr(backbone, f"norm{i}").bias.normal_()
    x = torch.randn(2, 3, 64, 96)
    maps = backbone.eval()(x)
    raw = backbone.forward_intermediates(x, intermediates_only=True)
    for i, (m, r) in enumerate(zip(maps, raw)):
        norm = getattr(backbone, f"norm{i}")
        expected = nn.functional.layer_norm(r.permute(0, 2, 3, 1), norm.normalized_shape,
                                            norm.weight, norm.bias, 1e-5).permute(0, 3, 1, 2)
        torch.testing.assert_close(m, expected)


def test_every_segmentor_parameter_gets_a_gradient_each_step():
    """What DDP needs (no unused parameters): one training step reaches every parameter."""
    from engine.segmentation import SegLoss
    cfg = load_config(SEG_DEMO_CFG)
    model = build_segmentor(cfg).train()
    x = torch.randn(2, 3, 64, 64)
    target = torch.randint(0, DIGITS_CLASSES, (2, 64, 64))
    SegLoss(255, 0.4)(model(x), target).backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


def test_seg_loss_averages_over_all_pixels_as_mmseg():
    """mmseg 0.11: per-pixel cross-entropy, ignored pixels 0, mean over all pixels; decode +
    0.4 x auxiliary. By hand: 2 classes, logits (0, 0) -> ln 2 per pixel, logits (ln 3, 0) ->
    ln(4/3) for class 0; 2 of the 4 pixels ignored."""
    from engine.segmentation import SegLoss
    logits = torch.zeros(1, 2, 2, 2)
    logits[0, 0, 0, 1] = math.log(3)
    aux = torch.zeros(1, 2, 2, 2)
    target = torch.tensor([[[1, 0], [255, 255]]])
    loss = SegLoss(255, 0.4)((logits, aux), target)
    expected = (math.log(2) + math.log(4 / 3)) / 4 + 0.4 * (2 * math.log(2)) / 4
    assert loss.item() == pytest.approx(expected)
    assert SegLoss(255, 0.4)(logits, target).item() == pytest.approx(
        (math.log(2) + math.log(4 / 3)) / 4)


def test_seg_loss_of_an_all_ignored_batch_is_zero_not_nan():
    from engine.segmentation import SegLoss
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    loss = SegLoss(255, 0.4)((logits, logits * 2), torch.full((2, 4, 4), 255))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("variant", ["t", "s", "b"])
def test_ade20k_configs_train_in_fp32_unless_asked(variant):
    path = os.path.join(ROOT, f"configs/seg/upernet_mg_ssaf_{variant}_512x512_160k_ade20k.yaml")
    assert load_config(path).AMP_ENABLE is False
    assert load_config(path, ["AMP_ENABLE", "True"]).AMP_ENABLE is True


def test_heads_are_initialised_as_mmcv():
    """mmcv's ConvModule: conv Kaiming normal (fan_out, ReLU): std sqrt(2 / (k*k*out)); BN
    weight 1, bias 0; conv_seg normal(0, 0.01), bias 0 (PyTorch's defaults differ: uniform
    with std 1 / sqrt(3 fan_in), a non-zero bias)."""
    torch.manual_seed(0)
    head = UPerHead([32, 64, 128, 256], num_classes=150, channels=256)
    aux = FCNHead(128, num_classes=150, channels=256)
    for module in (head.fpn_bottleneck, head.bottleneck, aux.convs[0], head.ppm[0][1]):
        conv, bn = module[0], module[1]
        fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
        assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.05)
        assert conv.weight.mean().abs().item() < 0.1 * math.sqrt(2 / fan_out)
        assert torch.equal(bn.weight, torch.ones_like(bn.weight))
        assert torch.equal(bn.bias, torch.zeros_like(bn.bias))
    for conv_seg in (head.conv_seg, aux.conv_seg):
        assert conv_seg.weight.std().item() == pytest.approx(0.01, rel=0.05)
        assert torch.equal(conv_seg.bias, torch.zeros_like(conv_seg.bias))


def test_head_init_pytorch_keeps_the_layers_defaults():
    """SEG.HEAD_INIT 'pytorch' (the digits demo): PyTorch's own init, conv_seg with std
    1 / sqrt(3 fan_in) and a non-zero bias; the default stays mmcv's; anything else is refused."""
    cfg = load_config(os.path.join(ROOT, "configs/seg/upernet_mg_ssaf_t_512x512_160k_ade20k.yaml"))
    assert cfg.SEG.HEAD_INIT == "mmcv"
    torch.manual_seed(0)
    head = UPerHead([32, 64, 128, 256], num_classes=150, channels=256, init="pytorch")
    assert head.conv_seg.weight.std().item() == pytest.approx(1 / math.sqrt(3 * 256), rel=0.05)
    assert head.conv_seg.bias.abs().sum() > 0
    conv = head.fpn_bottleneck[0]
    fan_in = conv.in_channels * 9
    assert conv.weight.std().item() == pytest.approx(1 / math.sqrt(3 * fan_in), rel=0.05)
    with pytest.raises(ValueError, match="head init 'kaiming'"):
        FCNHead(128, num_classes=150, channels=256, init="kaiming")


def test_seg_weight_decay_groups_follow_the_recipes_paramwise_cfg():
    """decay_mult 0 only for names containing 'norm' (every LayerNorm of MG-SSAF, the output
    norms norm0..norm3), 'relative_position_bias_table', 'absolute_pos_embed'; biases and the
    heads' BatchNorm keep TRAIN.WEIGHT_DECAY (main.py keeps Swin's set_weight_decay)."""
    from engine.segmentation import SegmentationTask
    cfg = load_config(SEG_DEMO_CFG)
    model = build_segmentor(cfg)
    optimizer = SegmentationTask().build_optimizer(cfg, model)
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    by_name = {n: decay[id(p)] for n, p in model.named_parameters()}
    assert len(by_name) == len(decay)
    assert {n for n, d in by_name.items() if d == 0.0} == {n for n in by_name if "norm" in n}
    assert {d for d in by_name.values()} == {0.0, cfg.TRAIN.WEIGHT_DECAY}
    for name in ("backbone.norm0.weight", "backbone.norm3.bias",
                 "backbone.layers.0.blocks.0.norm1.bias", "backbone.patch_embed.norm.weight"):
        assert by_name[name] == 0.0
    for name in ("decode_head.conv_seg.bias", "decode_head.bottleneck.1.weight",
                 "decode_head.bottleneck.1.bias", "backbone.patch_embed.ConvFuse.bias",
                 "backbone.layers.1.blocks.0.attn.attn_local_win.0.weight"):
        assert by_name[name] == cfg.TRAIN.WEIGHT_DECAY


def test_seg_refuses_layer_decay():
    from config import ConfigError
    from engine.segmentation import SegmentationTask
    cfg = load_config(SEG_DEMO_CFG,
                      ["TRAIN.LAYER_DECAY", "0.9"])
    cfg.defrost()
    with pytest.raises(ConfigError, match="no layer-wise LR decay"):
        SegmentationTask().prepare_config(cfg)


def test_multi_scale_test_images_are_the_original_resized_as_imrescale():
    """mmseg's MultiScaleFlipAug + imrescale: scale (int(w_s r), int(h_s r)), factor
    min(long / long side, short / short side), size int(w f + 0.5) x int(h f + 0.5), from the
    original image. (100, 50) x 0.75 = (75, 37): f = min(75/40, 37/20) = 1.85 -> 74 x 37."""
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 40, 3), np.uint8))
    label = Image.fromarray(np.zeros((20, 40), np.uint8))
    scales, target = SegTestTransform((100, 50), ratios=(0.75, 1.0))(image, label)
    assert target.shape == (20, 40)
    for x, size in zip(scales, [(74, 37), (100, 50)]):
        expected = np.asarray(image.resize(size, Image.BILINEAR)).astype(np.float32)
        mean = np.asarray([0.485, 0.456, 0.406], np.float32) * 255
        std = np.asarray([0.229, 0.224, 0.225], np.float32) * 255
        torch.testing.assert_close(x, torch.from_numpy(((expected - mean) / std)
                                                       .transpose(2, 0, 1).copy()))
    single, _ = SegTestTransform((100, 50))(image, label)
    assert torch.equal(single, scales[1])


def test_ms_flip_runs_the_model_on_each_given_scale_as_is():
    """No resizing of the per-scale images: the model sees each one and its flip."""
    seen = []

    class Recorder(nn.Conv2d):
        def forward(self, x):
            seen.append(x)
            return super().forward(x)

    model = Recorder(3, 4, 1).eval()
    scales = [torch.randn(1, 3, 32, 64), torch.randn(1, 3, 64, 128)]
    probs = ms_flip_inference(model, scales, (20, 40), ratios=(9.0,), flip=True)
    assert probs.shape == (1, 4, 20, 40) and len(seen) == 4
    for got, want in zip(seen, [scales[0], scales[0].flip(-1), scales[1], scales[1].flip(-1)]):
        assert torch.equal(got, want)
    expected = sum(whole_inference(model, x, (20, 40)) for x in scales
                   for _ in range(2)) / 4  # a pointwise model: flip, predict, flip back = same
    torch.testing.assert_close(probs, expected)
