"""MG-SSAF as a timm backbone: the model contract timm checks on its zoo (tests/test_models.py of
pytorch-image-models: forward/backward, default cfgs, reset_classifier, features_only,
forward_intermediates, export), local weights, layer-wise LR decay groups, and a segmentation
encoder. Small inputs (64x96, non-square) keep it fast; the T/S/B networks are the real ones.

TorchScript is not supported: torch.jit.script is deprecated in torch 2.x and cannot compile the
AF module, whose forward unpacks its three layers (``dw, act, pw = self``); torch.export works and
is tested instead.
"""
import logging
import os

import pytest
import timm
import torch
from timm.models import FeatureInfo, group_parameters
from timm.optim import param_groups_layer_decay

from config import load_config
from models import build_model, checkpoint_filter_fn
from models.build import model_kwargs
from models.checkpoint_io import load_pretrained
from models.variants import VARIANTS, variant_kwargs

NAMES = ["mg_ssaf_t", "mg_ssaf_s", "mg_ssaf_b"]
YAML = {"mg_ssaf_t": "T", "mg_ssaf_s": "S", "mg_ssaf_b": "B"}
SIZE = (64, 96)  # H, W: multiples of 32, not square


def _input(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, *SIZE, generator=torch.Generator().manual_seed(0))


def _yaml(name: str) -> str:
    return os.path.join("configs", "MG-SSAF", f"MG-SSAF-{YAML[name]}.yaml")


@pytest.fixture(scope="module")
def checkpoint_t(tmp_path_factory) -> str:
    """A project checkpoint of MG-SSAF-T: weights, a yacs config and training entries."""
    config = load_config(_yaml("mg_ssaf_t"))
    torch.manual_seed(1)
    model = build_model(config)
    path = str(tmp_path_factory.mktemp("ckpt") / "mg_ssaf_t.pth")
    torch.save({"model": model.state_dict(), "config": config, "epoch": 299,
                "max_accuracy": 80.0}, path)
    return path


@pytest.mark.parametrize("name", NAMES)
def test_registered_network_is_the_config_network(name):
    """timm.create_model and build_model(config) of the released YAML build the same network."""
    config = load_config(_yaml(name))
    from_config, from_timm = build_model(config), timm.create_model(name)
    assert repr(from_config) == repr(from_timm)
    assert {k: v.shape for k, v in from_config.state_dict().items()} == \
           {k: v.shape for k, v in from_timm.state_dict().items()}
    assert name in timm.list_models("mg_ssaf*")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_table_gives_the_arguments_of_a_config_naming_the_variant(variant):
    """timm's entry points build from the variant table (models/ reads no config): the same
    MGSSAF arguments as build_model of a config that sets only MODEL.NAME."""
    assert variant_kwargs(variant) == model_kwargs(load_config(None, ["MODEL.NAME", variant]))


@pytest.mark.parametrize("name", NAMES)
def test_forward_backward(name):
    """timm's test_model_backward: every parameter gets a gradient, num_classes honoured."""
    model = timm.create_model(name, num_classes=42).train()
    outputs = model(_input())
    outputs.mean().backward()
    assert outputs.shape == (2, 42) and not torch.isnan(outputs).any()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing}"


@pytest.mark.parametrize("name", NAMES)
def test_default_cfg_and_classifier(name):
    """timm's test_model_default_cfgs: forward_features unpooled, reset_classifier(0) pooled
    features of head_hidden_size, reset_classifier(0, '') unpooled, cfg names real parameters."""
    model = timm.create_model(name).eval()
    cfg = model.pretrained_cfg
    x = _input(1)
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape == (1, model.num_features, SIZE[0] // 32, SIZE[1] // 32)
        pre_logits = model.forward_head(features, pre_logits=True)
        assert pre_logits.shape == (1, model.head_hidden_size)
        torch.testing.assert_close(model(x), model.get_classifier()(pre_logits))
        model.reset_classifier(0)
        pooled = model(x)
        assert pooled.shape == (1, model.head_hidden_size)
        torch.testing.assert_close(pooled, pre_logits)
        model.reset_classifier(0, "")
        assert model(x).shape == (1, model.head_hidden_size, SIZE[0] // 32, SIZE[1] // 32)
        model.reset_classifier(7, "avg")
        assert model(x).shape == (1, 7) and model.num_classes == 7
    state = model.state_dict()
    assert cfg["classifier"] + ".weight" in state and cfg["first_conv"] + ".weight" in state
    assert cfg["input_size"] == (3, 224, 224) and cfg["pool_size"] == (7, 7)


def test_num_classes_zero_is_identity_head():
    model = timm.create_model("mg_ssaf_t", num_classes=0).eval()
    assert isinstance(model.head, torch.nn.Identity)
    assert not any(k.startswith("head.") for k in model.state_dict())
    with torch.no_grad():
        assert model(_input(1)).shape == (1, 1280)
    config = load_config(_yaml("mg_ssaf_t"), ["MODEL.NUM_CLASSES", "0"])
    assert isinstance(build_model(config).head, torch.nn.Identity)


# a small MG-SSAF for the contract tests (same code as T/S/B, the fast paths included)
SMALL = dict(embed_dim=24, depths=(1, 1, 1, 1), num_heads=(1, 6, 6, 2), head_hidden_dim=64)


def test_device_and_dtype_arguments():
    """timm's construction contract: device and dtype keyword arguments reach every parameter
    (the meta device included, as timm's default-cfg test builds models); in_chans is kept."""
    meta = timm.create_model("mg_ssaf_t", device="meta", dtype=torch.float64)
    assert {(p.device.type, p.dtype) for p in meta.parameters()} == {("meta", torch.float64)}
    assert meta.in_chans == 3 == meta.pretrained_cfg["input_size"][0]
    model = timm.create_model("mg_ssaf_t", dtype=torch.float64, in_chans=1, **SMALL).eval()
    assert model.in_chans == 1 and {p.dtype for p in model.parameters()} == {torch.float64}
    with torch.no_grad():
        assert model(torch.randn(2, 1, 64, 96, dtype=torch.float64)).dtype == torch.float64
    with pytest.raises(TypeError):
        timm.create_model("mg_ssaf_t", device="meta", not_a_model_arg=1)


@pytest.mark.parametrize("global_pool", ["avg", ""])
def test_reset_classifier_keeps_device_dtype_and_mode(global_pool):
    """reset_classifier builds the new head on the model's device, in its dtype and train/eval
    mode, for either pooling; with global_pool '' the head classifies every position."""
    model = timm.create_model("mg_ssaf_t", num_classes=0, global_pool=global_pool, **SMALL)
    model.to(torch.float64).eval()
    x = torch.randn(2, 3, 64, 96, dtype=torch.float64)
    model.reset_classifier(0)
    model.reset_classifier(5)
    assert model.head.weight.dtype == torch.float64 and model.num_classes == 5
    assert not any(m.training for m in model.modules())
    with torch.no_grad():
        features = model.forward_features(x)
        pre_logits = model.forward_head(features, pre_logits=True)
        logits = model(x)
    if global_pool:
        torch.testing.assert_close(logits, model.head(pre_logits))
    else:
        assert logits.shape == (2, 5, 2, 3)
        torch.testing.assert_close(logits, torch.einsum("bchw,kc->bkhw", pre_logits,
                                                        model.head.weight)
                                   + model.head.bias.view(1, -1, 1, 1))
    model.train()
    model.reset_classifier(3, "avg")
    assert model.head.training and model.global_pool == "avg"
    meta = timm.create_model("mg_ssaf_t", device="meta").eval()
    meta.reset_classifier(4)
    assert meta.head.weight.device.type == "meta" and not meta.head.training


def test_fx_feature_extraction():
    """features_only with timm's FX feature extractor (feature_cls="fx") traces the model and
    gives the maps of forward_intermediates; the input size check still runs on real inputs."""
    torch.manual_seed(0)
    fx = timm.create_model("mg_ssaf_t", features_only=True, feature_cls="fx", **SMALL).eval()
    torch.manual_seed(0)
    model = timm.create_model("mg_ssaf_t", **SMALL).eval()
    x = _input(2)
    with torch.no_grad():
        maps = model.forward_intermediates(x, intermediates_only=True)
        for out, ref in zip(fx(x), maps, strict=True):
            torch.testing.assert_close(out, ref, rtol=0, atol=0)
        with pytest.raises(ValueError, match="multiples of 32"):
            fx(torch.randn(1, 3, 64, 80))


@pytest.mark.parametrize("name", [*NAMES[:2], pytest.param(NAMES[2], marks=pytest.mark.slow)])
def test_features_only_and_forward_intermediates(name):
    """timm's test_model_forward_features / test_model_forward_intermediates: four NCHW maps
    at strides 4/8/16/32 with C/2C/4C/8C channels; forward_intermediates' final output is
    forward_features (with and without grad checkpointing)."""
    model = timm.create_model(name).eval()
    info = FeatureInfo(model.feature_info, list(range(len(model.feature_info))))
    dim = model.feature_info[0]["num_chs"]
    assert info.channels() == [dim, 2 * dim, 4 * dim, 8 * dim]
    assert info.reduction() == [4, 8, 16, 32]
    x = _input(1)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x), rtol=0, atol=0)
        for c, r, m in zip(info.channels(), info.reduction(), maps):
            assert m.shape == (1, c, SIZE[0] // r, SIZE[1] // r)
        model.set_grad_checkpointing()
        final2, _ = model.forward_intermediates(x)
        torch.testing.assert_close(final2, final)
        # indices: an int takes the last n; stop_early ends at the last one taken
        last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)
        assert [m.shape[1] for m in last_two] == info.channels()[2:]
        early, first = model.forward_intermediates(x, indices=[0, 1], stop_early=True)
        torch.testing.assert_close(first[1], maps[1])
        torch.testing.assert_close(early, maps[1])
        normed = model.forward_intermediates(x, indices=[3], norm=True, intermediates_only=True)
        torch.testing.assert_close(normed[0], final)

    features = timm.create_model(name, features_only=True).eval()
    kept = {k: v for k, v in model.state_dict().items()
            if not k.startswith(("last_conv", "head", "norm"))}  # pruned by features_only
    features.model.load_state_dict(kept)
    assert features.feature_info.channels() == info.channels()
    with torch.no_grad():
        outs = features(x)
    assert len(outs) == 4
    for out, ref in zip(outs, maps):
        torch.testing.assert_close(out, ref)

    subset = timm.create_model(name, features_only=True, out_indices=(1, 2))
    assert len(subset.model.layers) == 3 and subset.model.layers[-1].downsample is None
    assert subset.feature_info.reduction() == [8, 16]


def test_features_only_320x480_base():
    """MG-SSAF-B's feature maps on a 320x480 input (not square, not a multiple of 224)."""
    model = timm.create_model("mg_ssaf_b", features_only=True).eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 320, 480))
    assert [tuple(o.shape) for o in outs] == [(1, 128, 80, 120), (1, 256, 40, 60),
                                             (1, 512, 20, 30), (1, 1024, 10, 15)]


def test_bad_input_size_is_named():
    model = timm.create_model("mg_ssaf_t")
    with pytest.raises(ValueError, match=r"multiples of 32, got \(64, 80\)"):
        model.forward_intermediates(torch.randn(1, 3, 64, 80))


@pytest.mark.slow
def test_torch_export():
    """torch.export (timm's replacement for the TorchScript check) gives the same logits."""
    model = timm.create_model("mg_ssaf_t").eval()
    x = _input(1)
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), model(x))


def test_local_pretrained_weights_equal_build_model(checkpoint_t, caplog):
    """pretrained=True with a local file (project checkpoint with a yacs config inside) gives
    the logits of build_model(config) + --pretrained; other class counts re-initialise the head
    with a log line; a state-dict overlay goes through checkpoint_filter_fn."""
    config = load_config(_yaml("mg_ssaf_t"))
    reference = build_model(config).eval()
    load_pretrained(checkpoint_t, reference, logging.getLogger("test"))
    model = timm.create_model("mg_ssaf_t", pretrained=True,
                              pretrained_cfg_overlay=dict(file=checkpoint_t)).eval()
    x = _input(1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)

    ckpt = torch.load(checkpoint_t, weights_only=False)
    assert set(checkpoint_filter_fn(ckpt, reference)) == set(reference.state_dict())
    ddp_weights = {"module." + k: v for k, v in ckpt["model"].items()}  # a DDP-wrapped save
    overlay = timm.create_model("mg_ssaf_t", pretrained=True,
                                pretrained_cfg_overlay=dict(state_dict=ddp_weights)).eval()
    with torch.no_grad():
        torch.testing.assert_close(overlay(x), reference(x), rtol=0, atol=0)

    with caplog.at_level(logging.INFO):
        cub = timm.create_model("mg_ssaf_t", num_classes=200, pretrained=True,
                                pretrained_cfg_overlay=dict(file=checkpoint_t))
    assert ("head.weight has shape (1000, 1280), the model (200, 1280): the head starts from its "
            "initialisation") in caplog.text
    torch.testing.assert_close(cub.last_conv.weight, reference.last_conv.weight)
    assert sum(p.numel() for p in cub.parameters()) / 1e6 == pytest.approx(18.5, abs=0.1)  # paper

    feats = timm.create_model("mg_ssaf_t", features_only=True, pretrained=True,
                              pretrained_cfg_overlay=dict(file=checkpoint_t)).eval()
    with torch.no_grad():
        torch.testing.assert_close(feats(x), reference.forward_intermediates(
            x, intermediates_only=True), rtol=0, atol=0)
    headless = timm.create_model("mg_ssaf_t", num_classes=0, pretrained=True,
                                 pretrained_cfg_overlay=dict(file=checkpoint_t)).eval()
    with torch.no_grad():
        torch.testing.assert_close(headless(x), reference.forward_head(
            reference.forward_features(x), pre_logits=True), rtol=0, atol=0)


def test_released_layout_checkpoint_loads_as_pretrained_weights(reference_dir, tmp_path, caplog):
    """A checkpoint with exactly the released keys (MG-SSAF-T.keys.txt: 24 never-applied
    ``attn.norm`` entries among them) initialises a model through --pretrained's loader and
    timm's local-file path, for ImageNet and for CUB's 200 classes (head re-initialised)."""
    weights = {}
    with open(os.path.join(reference_dir, "MG-SSAF-T.keys.txt"), encoding="utf-8") as f:
        for line in f:
            name, shape = line.split()
            weights[name] = torch.randn([int(n) for n in shape.split("x")])
    assert sum(".attn.norm." in k for k in weights) == 24
    path = str(tmp_path / "mg_ssaf_tiny.pth")
    torch.save({"model": weights}, path)
    model = build_model(load_config(_yaml("mg_ssaf_t")))
    load_pretrained(path, model, logging.getLogger("test"))
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, weights[key], rtol=0, atol=0, msg=key)
    timm_model = timm.create_model("mg_ssaf_t", pretrained=True,
                                   pretrained_cfg_overlay=dict(file=path))
    torch.testing.assert_close(timm_model.head.weight, weights["head.weight"], rtol=0, atol=0)
    with caplog.at_level(logging.INFO):
        cub = timm.create_model("mg_ssaf_t", num_classes=200, pretrained=True,
                                pretrained_cfg_overlay=dict(file=path))
    assert "the head starts from its initialisation" in caplog.text
    torch.testing.assert_close(cub.last_conv.weight, weights["last_conv.weight"], rtol=0, atol=0)


def test_no_pretrained_file_is_an_error():
    """Nothing is downloaded: without a local file, pretrained=True fails."""
    with pytest.raises(RuntimeError, match="No pretrained weights exist for mg_ssaf_t"):
        timm.create_model("mg_ssaf_t", pretrained=True)


def test_group_matcher_and_layer_decay():
    """Groups: stem first, then every block (a stage's PatchMerging and the final norm join the
    block before them), then last_conv + head; layer decay scales the LR along that order."""
    model = timm.create_model("mg_ssaf_t")
    groups = list(group_parameters(model, model.group_matcher(coarse=False)).values())
    assert len(groups) == 1 + 12 + 1  # stem, 12 blocks, head
    assert all(n.startswith("patch_embed.") for n in groups[0])
    assert {n.split(".")[2] for n in groups[2]} == {"blocks", "downsample"}
    assert all(n.startswith(("layers.0.blocks.1.", "layers.0.downsample.")) for n in groups[2])
    assert "norm.weight" in groups[-2]
    assert set(groups[-1]) == {"last_conv.weight", "last_conv.bias", "head.weight", "head.bias"}
    assert len(group_parameters(model, model.group_matcher(coarse=True))) == 1 + 4 + 1

    param_groups = param_groups_layer_decay(model, 0.05, model.no_weight_decay(), layer_decay=0.5)
    by_param = {id(p): (g["lr_scale"], g["weight_decay"])
                for g in param_groups for p in g["params"]}
    params = dict(model.named_parameters())
    assert by_param[id(params["head.weight"])] == (1.0, 0.05)
    assert by_param[id(params["head.bias"])] == (1.0, 0.0)
    assert by_param[id(params["patch_embed.Conv2Down.weight"])] == (0.5 ** 13, 0.05)
    assert by_param[id(params["layers.0.blocks.0.norm1.weight"])] == (0.5 ** 12, 0.0)
    assert by_param[id(params["layers.0.downsample.pwconv1.weight"])] == (0.5 ** 11, 0.05)
    assert "norm.weight" in model.no_weight_decay()


@pytest.mark.slow
def test_segmentation_models_pytorch_encoder():
    """segmentation_models_pytorch's timm-universal encoder ``tu-mg_ssaf_t`` in UPerNet at
    512x512: forward and backward (strides 4..32 read as a transformer-style encoder)."""
    smp = pytest.importorskip("segmentation_models_pytorch")
    model = smp.UPerNet("tu-mg_ssaf_t", encoder_weights=None, classes=5).train()
    images = torch.randn(2, 3, 512, 512)  # 2: the decoder has BatchNorm
    masks = model(images)
    assert masks.shape == (2, 5, 512, 512)
    masks.mean().backward()
    encoder_grads = [p.grad for p in model.encoder.parameters()]
    assert all(g is not None for g in encoder_grads)


def test_cub_head_params_and_flops_at_448():
    """The paper's CUB models: 200-class head, 448 input: GFLOPs 4x those at 224."""
    from tools.model_info import count_gmacs, count_params
    model = timm.create_model("mg_ssaf_t", num_classes=200)
    assert count_params(model) / 1e6 == pytest.approx(18.5, abs=0.1)
    ratio = count_gmacs(model, (448, 448)) / count_gmacs(model, (224, 224))
    assert ratio == pytest.approx(4.0, rel=0.02)


@pytest.mark.slow
def test_torch_hub_loads_the_variants_from_a_local_checkout_anywhere(checkpoint_t, tmp_path):
    """hubconf.py: torch.hub.load(<checkout>, "mg_ssaf_t", source="local") from another folder
    (a process whose path does not hold the checkout), with a local checkpoint."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = (
        "import sys, torch\n"
        f"repo, ckpt = {root!r}, {checkpoint_t!r}\n"
        "assert repo not in sys.path\n"
        "m = torch.hub.load(repo, 'mg_ssaf_t', source='local', checkpoint=ckpt).eval()\n"
        "w = torch.load(ckpt, weights_only=False)['model']['head.weight']\n"
        "assert torch.equal(m.head.weight, w)\n"
        "s = torch.hub.load(repo, 'mg_ssaf_s', source='local', num_classes=7)\n"
        "params = round(sum(p.numel() for p in m.parameters()) / 1e6, 2)\n"
        "print(type(m).__name__, s.num_classes, params)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", script], cwd=str(tmp_path), env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines() == ["MGSSAF 7 19.58"]
