"""The model computes the released network: golden logits, released keys, shapes, gradients."""
import os
import re

import pytest
import torch

from config import load_config
from helpers import ON_CUDA, device_under_test, golden_model, ieee_float32, run_tool
from models import build_model
from models.mg_ssaf import MGSSAF, MGSSAFAttention

VARIANTS = {"T": 19.6, "S": 32.5, "B": 55.9}  # released parameter counts, millions
TINY = dict(embed_dim=24, depths=(1, 1, 1, 1), num_heads=(1, 6, 6, 2), num_classes=10,
            head_hidden_dim=32)


def _config(variant: str):
    return load_config(os.path.join("configs", "MG-SSAF", f"MG-SSAF-{variant}.yaml"))


def _keys_state_dict(reference_dir: str, variant: str) -> dict:
    state = {}
    with open(os.path.join(reference_dir, f"MG-SSAF-{variant}.keys.txt")) as f:
        for line in f:
            name, shape = line.split()
            state[name] = torch.randn([int(s) for s in shape.split("x")])
    return state


# On the CPU the golden tests run the fused kernels; MGSSAF_TEST_DEVICE=cuda (tools/gpu_check.py)
# runs them on the GPU, in PyTorch ops and, for one network, in the compiled local attention
# (Inductor's Triton kernels: float64 and float32 graphs of every stage). On the CPU
# tests/test_local_attention.py compares the compiled path with the ops.
GOLDEN_CASES = [("global050", "ops"), ("global075", "ops")] + (
    [("global050", "compiled")] if ON_CUDA else [])


@pytest.mark.parametrize("name,local_attention", GOLDEN_CASES)
def test_golden_logits(reference_dir, name, local_attention):
    device = device_under_test()
    model, golden = golden_model(reference_dir, name, local_attention)
    model, images = model.to(device), golden["input"].to(device)
    with torch.no_grad(), ieee_float32(device):
        out64 = model.double()(images.double()).cpu()
        out32 = model.float()(images).cpu()
    assert (out64 - golden["logits"]).abs().max().item() < 1e-9
    assert (out32.double() - golden["logits"]).abs().max().item() < 1e-4


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_released_config_files_load_the_released_keys_strictly(reference_dir, variant):
    """The released repository's own YAML builds the network its checkpoint's keys describe."""
    config = load_config(os.path.join(reference_dir, "released-configs", f"MG-SSAF-{variant}.yaml"))
    model = build_model(config)
    model.load_state_dict(_keys_state_dict(reference_dir, variant))  # strict


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_released_keys_load_strict(reference_dir, variant):
    model = build_model(_config(variant))
    state = _keys_state_dict(reference_dir, variant)
    model.load_state_dict(state)  # strict; the unused attn.norm keys are dropped by a load hook
    assert torch.equal(model.head.weight, state["head.weight"])
    assert not any(".attn.norm." in k for k in model.state_dict())
    params = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(params - VARIANTS[variant]) <= 0.1

    renamed = dict(state)
    renamed["layers.0.blocks.0.attn.proj_qkv_renamed.weight"] = renamed.pop(
        "layers.0.blocks.0.attn.proj_qkv.weight")
    with pytest.raises(RuntimeError, match=re.escape("layers.0.blocks.0.attn.proj_qkv.weight")):
        model.load_state_dict(renamed)
    reshaped = dict(state)
    reshaped["layers.2.blocks.0.mlp.pwconv1.weight"] = torch.zeros(1, 1, 1, 1)
    with pytest.raises(RuntimeError, match=re.escape("layers.2.blocks.0.mlp.pwconv1.weight")):
        model.load_state_dict(reshaped)


def test_only_attn_norm_keys_are_dropped():
    model = MGSSAF(**TINY)
    state = model.state_dict()
    state["layers.0.blocks.0.attn.norm.weight"] = torch.ones(24)
    state["layers.0.blocks.0.attn.norm.bias"] = torch.zeros(24)
    model.load_state_dict(state)
    state["layers.0.blocks.0.attn.extra.weight"] = torch.ones(24)
    with pytest.raises(RuntimeError, match=re.escape("layers.0.blocks.0.attn.extra.weight")):
        model.load_state_dict(state)


@pytest.mark.parametrize("size", [(224, 224), (448, 448), (256, 320), (64, 96)])
def test_output_shapes(size):
    model = MGSSAF(**TINY).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, *size))
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()


def test_input_not_multiple_of_32_is_an_error():
    with pytest.raises(ValueError, match="multiples of 32"):
        MGSSAF(**TINY)(torch.randn(1, 3, 224, 200))


def test_padded_windows_give_padded_keys_zero_weight():
    attn = MGSSAFAttention(dim=12, num_heads=2, global_ratio=0.0, strip_width=0, window_size=7)
    x = torch.randn(2, 12, 10, 12)  # (B, C, H, W): padded to 14 x 14, four windows
    captured = {}
    hook = attn.attn_local_win.register_forward_hook(lambda m, a, o: captured.update(p=a[0]))
    out = attn(x)
    hook.remove()
    assert out.shape == x.shape and torch.isfinite(out).all()
    # separable map of every query: (heads, B, 2x2 windows row-major, 49 queries, 49 keys)
    p = captured["p"].view(2, 2, 2, 2, 49, 49)
    key_valid = torch.zeros(14, 14, dtype=torch.bool)
    key_valid[:10, :12] = True
    key_valid = key_valid.view(2, 7, 2, 7).transpose(1, 2).reshape(2, 2, 49)
    for wi in range(2):
        for wj in range(2):
            valid = key_valid[wi, wj]
            real_queries = p[:, :, wi, wj][:, :, valid]  # (heads, B, real queries, 49)
            assert (real_queries[..., ~valid] == 0).all()
            torch.testing.assert_close(real_queries.sum(-1), torch.ones_like(real_queries[..., 0]))


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = MGSSAF(**TINY, drop_path_rate=0.1)
    model(torch.randn(2, 3, 64, 64)).logsumexp(-1).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_activation_checkpointing_matches():
    x = torch.randn(2, 3, 64, 64)
    results = []
    for use_checkpoint in (False, True):
        torch.manual_seed(0)
        model = MGSSAF(**TINY, drop_path_rate=0.2, use_checkpoint=use_checkpoint).train()
        torch.manual_seed(1)
        out = model(x)
        out.square().sum().backward()
        results.append((out, {n: p.grad for n, p in model.named_parameters()}))
    (out0, grads0), (out1, grads1) = results
    torch.testing.assert_close(out1, out0, rtol=0, atol=0)
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=0, atol=0, msg=name)


def test_config_drives_checkpointing():
    config = load_config(None, ["TRAIN.USE_CHECKPOINT", "True"])
    assert all(stage.grad_checkpointing for stage in build_model(config).layers)


@pytest.mark.slow
def test_torch_compile_matches_eager():
    torch.manual_seed(0)
    model = MGSSAF(**TINY).eval()
    x = torch.randn(2, 3, 64, 64)
    compiled = torch.compile(model)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(embed_dim=24, num_heads=(1, 5, 6, 2)), r"stage 1 .*dim 48 is not divisible by 5 heads"),
    (dict(embed_dim=24, num_heads=(1, 4, 6, 2)), r"stage 1 .*2 global heads is not a multiple of 3"),
    (dict(embed_dim=24, strip_width=(0, 3, 2, 0)), r"stage 1 .*strip width 3 does not divide the "
                                                   r"stage resolution 28"),
    (dict(embed_dim=24, global_ratio=(0.0, 1.0, 0.5, 0.0)), r"stage 1 .*GLOBAL_RATIO must be in"),
    (dict(embed_dim=24, depths=(1, 1, 1)), r"one entry per stage"),
    (dict(embed_dim=24, img_size=200), r"DATA.IMG_SIZE 200 must be a multiple of 32"),
])
def test_construction_errors(kwargs, message):
    args = dict(TINY)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        MGSSAF(**args)


@pytest.mark.slow
def test_model_info_reports_paper_figures():
    from tools.model_info import count_gmacs, count_params
    paper_gflops = {"T": 3.1, "S": 5.6, "B": 9.8}
    for variant, gflops in paper_gflops.items():
        model = build_model(_config(variant))
        assert abs(count_params(model) / 1e6 - VARIANTS[variant]) <= 0.1
        assert abs(count_gmacs(model, (224, 224)) / gflops - 1) < 0.10, variant
    # the counter sees PyTorch ops only: the fused CPU kernels' products are counted too
    t = build_model(_config("T"))
    assert count_gmacs(t, (224, 224)) == pytest.approx(3.327, abs=1e-3)


@pytest.mark.cli
def test_model_info_cli():
    done = run_tool("tools/model_info.py", "--cfg", "configs/MG-SSAF/MG-SSAF-T.yaml",
                    "--img-size", "256", "320", timeout=None)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert re.fullmatch(r"mg_ssaf_tiny: 19\.58 M parameters, \d+\.\d\d GFLOPs at 256x320\n", out)


@pytest.mark.cli
def test_model_info_cli_names_a_bad_config():
    result = run_tool("tools/model_info.py", "--cfg", "configs/MG-SSAF/MG-SSAF-T.yaml", "--opts",
                      "MODEL.NAME", "custom", "MODEL.MGSSAF.NUM_HEADS", "[3, 5, 12, 24]",
                      timeout=None)
    assert result.returncode == 1
    assert "error: stage 1 (dim 192" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.cli
@pytest.mark.parametrize("size, message", [
    (["100"], "error: MG-SSAF needs input sides that are multiples of 32, got (100, 100)"),
    (["0"], "error: --img-size must be positive, got 0x0")])
def test_model_info_cli_names_a_bad_input_size(size, message):
    result = run_tool("tools/model_info.py", "--cfg", "configs/MG-SSAF/MG-SSAF-T.yaml",
                      "--img-size", *size, timeout=None)
    assert result.returncode == 1 and result.stderr == f"model_info.py: {message}\n"
