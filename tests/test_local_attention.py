"""SS-MSA + AF through torch.compile (``local_attention="compiled"``, MODEL.MGSSAF.LOCAL_ATTENTION):
the same numbers and gradients as the eager PyTorch ops, used only where it applies.

On CUDA Inductor turns ``windowed_attention`` into Triton kernels; here, on CPU, into C++: the
same graph (Dynamo's capture, AOTAutograd's forward and backward), another code generator. No
GPU was available where these tests were written; tools/gpu_check.py covers the CUDA side.
"""
import pytest
import torch

from config import load_config
from helpers import device_under_test, ieee_float32
from models import build_model, mg_ssaf, separable
from models.mg_ssaf import MGSSAF, MGSSAFAttention, windowed_attention

TINY = dict(embed_dim=24, depths=(1, 1, 1, 1), num_heads=(1, 6, 6, 2), num_classes=10,
            head_hidden_dim=32)


def _attention(local_attention: str, dtype=torch.float64, device="cpu") -> MGSSAFAttention:
    """2 local heads of head dimension 8, AF parameters far from their init."""
    torch.manual_seed(0)
    attn = MGSSAFAttention(16, 2, 0.0, 0, 7, local_attention=local_attention)
    attn = attn.to(device=device, dtype=dtype)
    with torch.no_grad():
        for p in attn.attn_local_win.parameters():
            p.normal_(0, 0.5)
    return attn


def _local(attn: MGSSAFAttention, b: int, h: int, w: int, dtype=torch.float64,
           device="cpu") -> torch.Tensor:
    """The local block of a (B, H, W, 2*dim) projection: a strided view, as in forward()."""
    x = torch.randn(b, h, w, 2 * 16, dtype=dtype).to(device)
    return x[..., :attn.local_channels]


def _outputs_and_gradients(attn: MGSSAFAttention, x: torch.Tensor, grad: torch.Tensor):
    x = x.detach().requires_grad_(True)
    params = list(attn.attn_local_win.parameters())
    out = attn.ss_msa(x)
    return (out, *torch.autograd.grad(out, [x, *params], grad))


# Inductor compiles a forward and a backward graph: 20-40 s on 2 busy cores. On the GPU with
# MGSSAF_TEST_DEVICE=cuda (tools/gpu_check.py): Triton kernels against the eager CUDA ops.
@pytest.mark.slow
@pytest.mark.parametrize("size,dtype", [
    ((1, 14, 14), torch.float64),  # two windows across: no padding
    ((2, 10, 12), torch.float64),  # padded to 14 x 14, four windows per map, masked keys
    ((2, 10, 12), torch.float32),
], ids=["unpadded-float64", "padded-float64", "padded-float32"])
def test_compiled_equals_the_ops_with_gradients(size, dtype):
    device = device_under_test()
    compiled, ops = (_attention(how, dtype, device) for how in ("compiled", "ops"))
    ops.load_state_dict(compiled.state_dict())
    x = _local(compiled, *size, dtype=dtype, device=device)
    grad = torch.randn(*size, compiled.num_local, compiled.head_dim, dtype=dtype).to(device)
    # pytorch_ops: the CPU kernels would take the unpadded map
    with separable.pytorch_ops(), ieee_float32(device):
        got = _outputs_and_gradients(compiled, x, grad)
        expected = _outputs_and_gradients(ops, x, grad)
    eps = torch.finfo(dtype).eps
    for name, g, e in zip(["out", "x", "dw.weight", "dw.bias", "pw.weight", "pw.bias"],
                          got, expected):
        assert g.shape == e.shape and g.dtype == dtype, name
        # round-off of sums over up to a few thousand terms (the parameter gradients)
        torch.testing.assert_close(g, e, rtol=1e3 * eps, atol=1e3 * eps * e.abs().max().item(),
                                   msg=name)


class _Recorder:
    """Stands in for ``compiled_windowed_attention``: counts its calls, runs the eager ops."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, *args):
        self.calls += 1
        return windowed_attention(*args)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_compiled_path_is_taken_only_where_it_applies(monkeypatch):
    """Not for "ops", not where the CPU kernels apply (they stay first on CPU), not in graphs
    recorded around the model (torch.compile, torch.export, torch.jit.trace see plain ops)."""
    recorder = _Recorder()
    monkeypatch.setattr(mg_ssaf, "compiled_windowed_attention", recorder)
    compiled, ops = _attention("compiled", torch.float32), _attention("ops", torch.float32)
    unpadded, padded = _local(compiled, 1, 14, 14, torch.float32), _local(compiled, 1, 10, 12,
                                                                          torch.float32)

    def calls(fn) -> int:
        before = recorder.calls
        fn()
        return recorder.calls - before

    assert calls(lambda: ops.ss_msa(padded)) == 0
    assert calls(lambda: compiled.ss_msa(padded)) == 1  # no CPU kernel for padded maps
    with separable.pytorch_ops():
        assert calls(lambda: compiled.ss_msa(unpadded)) == 1
    if separable.fused_available(unpadded, 7, compiled.num_local, compiled.attn_local_win):
        assert calls(lambda: compiled.ss_msa(unpadded)) == 0

    images = torch.randn(1, 16, 10, 12)  # the attention module's (B, C, H, W) input
    with separable.pytorch_ops():
        # check_trace=False: the check would run the module again, untraced (the compiled path)
        assert calls(lambda: torch.jit.trace(compiled, images, check_trace=False)) == 0
        outer = torch.compile(compiled, backend="eager", fullgraph=True)
        assert calls(lambda: outer(images)) == 0
        assert calls(lambda: torch.export.export(compiled, (images,))) == 0
        assert calls(lambda: compiled(images)) == 1


def test_compiled_path_keeps_a_graph_per_shape_beyond_dynamos_default(monkeypatch):
    """More stage shapes than Dynamo's default recompile limit (8) all stay compiled, and the
    raised limit applies to these calls only."""
    import torch._dynamo.utils

    monkeypatch.setattr(mg_ssaf, "_compiled", [torch.compile(
        windowed_attention, dynamic=False, backend="eager")])  # Dynamo's capture, no codegen
    limit = 8  # Dynamo's default, set here: an earlier test of the session may have raised it
    attn = _attention("compiled", torch.float32)
    torch._dynamo.utils.counters.clear()
    with separable.pytorch_ops(), torch._dynamo.config.patch(recompile_limit=limit):
        for height in range(3, 3 + limit + 2):
            attn.ss_msa(_local(attn, 1, height, 7, torch.float32))
            assert torch._dynamo.config.recompile_limit == limit
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == limit + 2
    assert mg_ssaf.COMPILED_GRAPHS > limit


def test_config_key_and_keyword_reach_every_attention_module():
    import timm

    model = build_model(load_config(None, ["MODEL.MGSSAF.LOCAL_ATTENTION", "compiled"]))
    assert {m.local_attention for m in model.modules() if isinstance(m, MGSSAFAttention)} == {
        "compiled"}
    assert {m.local_attention for m in build_model(load_config(None)).modules()
            if isinstance(m, MGSSAFAttention)} == {"ops"}
    model = timm.create_model("mg_ssaf_t", local_attention="compiled", num_classes=0)
    assert all(m.local_attention == "compiled" for m in model.modules()
               if isinstance(m, MGSSAFAttention))
    with pytest.raises(ValueError, match="local_attention 'triton'"):
        MGSSAF(**TINY, local_attention="triton")
    with pytest.raises(ValueError, match="MODEL.MGSSAF.LOCAL_ATTENTION"):
        load_config(None, ["MODEL.MGSSAF.LOCAL_ATTENTION", "triton"])


def test_compiled_model_keeps_the_state_dict_and_outputs_of_the_ops(monkeypatch):
    """The option changes no parameter: the same state dict, the same logits (here through the
    recorder's eager ops; the compiled numbers are the slow test's)."""
    recorder = _Recorder()
    monkeypatch.setattr(mg_ssaf, "compiled_windowed_attention", recorder)
    torch.manual_seed(0)
    ops = MGSSAF(**TINY).eval()
    compiled = MGSSAF(**TINY, local_attention="compiled").eval()
    compiled.load_state_dict(ops.state_dict())  # strict
    images = torch.randn(1, 3, 64, 96)  # stage maps 16x24, 8x12, 4x6, 2x3: all padded
    with torch.no_grad():
        assert torch.equal(compiled(images), ops(images))
    assert recorder.calls == 4  # one block per stage
