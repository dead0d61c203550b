"""models.conv: bfloat16 autocast on CPUs without bfloat16 kernels runs the convolutions through
float32 on bfloat16-rounded operands, with the numbers and dtypes of a bfloat16 convolution."""
import copy

import pytest
import timm
import torch
from torch import nn
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

import models  # noqa: F401  (registers mg_ssaf_t with timm)
from models import conv, pointwise
from models.conv import Conv2d
from models.depthwise import DepthwiseConv2d
from models.pointwise import PointwiseConv2d

from helpers import ConvCalls, golden_model

MODULES = {
    "stem 3x3 s2": (lambda: Conv2d(16, 24, 3, stride=2, padding=1), 16),
    "pointwise": (lambda: PointwiseConv2d(32, 48), 32),
    "depthwise 7x7": (lambda: DepthwiseConv2d(32, 7), 32),
    "depthwise 3x3 s2": (lambda: DepthwiseConv2d(32, 3, stride=2), 32),
}


def _through_float32(monkeypatch, on: bool) -> None:
    monkeypatch.setattr(conv, "_BFLOAT16_NATIVE", not on)


def _run(module: nn.Module, x: torch.Tensor, grad: torch.Tensor):
    """Output and gradients (input, weight, bias) under CPU autocast to bfloat16."""
    x = x.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(x)
    params = [p for p in (module.weight, module.bias) if p is not None]
    return (out, *torch.autograd.grad(out, (x, *params), grad.to(out.dtype)))


@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(MODULES))
def test_through_float32_gives_a_bfloat16_convolutions_numbers_and_dtypes(
        monkeypatch, name, input_dtype):
    """Output (bfloat16) and gradients (input and parameters, in their own dtypes) agree with
    autocast's bfloat16 convolution to bfloat16 round-off: both are within 1% of float32 on the
    bf16-rounded operands, and these are as close to it (or within 2**-8); the forward is
    float32's rounded to bfloat16 but for an ulp where the sums' order differs."""
    factory, chans = MODULES[name]
    torch.manual_seed(0)
    module = factory().to(memory_format=torch.channels_last)
    x = torch.randn(2, chans, 14, 14).to(memory_format=torch.channels_last).to(input_dtype)
    out_shape = module(x.float()).shape
    grad = torch.randn(out_shape).bfloat16()

    _through_float32(monkeypatch, False)
    native = _run(module, x, grad)
    _through_float32(monkeypatch, True)
    with ConvCalls() as calls:
        got = _run(module, x, grad)
    exact = _run_float32(copy.deepcopy(module).bfloat16().float(), x, grad)

    assert calls.calls and all(c == (torch.float32, torch.float32, False) for c in calls.calls)
    assert [t.dtype for t in got] == [t.dtype for t in native]
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == input_dtype
    assert all(g.dtype == torch.float32 for g in got[2:])
    torch.testing.assert_close(got[0].float(), exact[0].bfloat16().float(),
                               rtol=2 ** -7, atol=1e-5)
    names = ["out", "x", "weight", "bias"]
    for label, g, n, e in zip(names, got, native, exact):
        scale = e.abs().max()
        error, native_error = ((t.float() - e).abs().max() / scale for t in (g, n))
        assert error < 1e-2 and error <= max(native_error, 2 ** -8), (name, label)


def _run_float32(module: nn.Module, x: torch.Tensor, grad: torch.Tensor):
    """Output and gradients in float32, on the bfloat16-rounded input and output gradient."""
    x = x.bfloat16().float().requires_grad_(True)
    out = module(x)
    params = [p for p in (module.weight, module.bias) if p is not None]
    return (out, *torch.autograd.grad(out, (x, *params), grad.float()))


def test_where_the_cpu_has_bfloat16_kernels_autocast_runs_them(monkeypatch):
    """With oneDNN's bfloat16 kernels (or without autocast) the module is nn.Conv2d."""
    _through_float32(monkeypatch, False)
    x = torch.randn(1, 16, 8, 8)
    module = MODULES["stem 3x3 s2"][0]()
    with torch.autocast("cpu", dtype=torch.bfloat16), ConvCalls() as calls:
        out = module(x)
    assert out.dtype == torch.bfloat16 and calls.calls == [(torch.float32, torch.float32, True)]
    _through_float32(monkeypatch, True)
    with ConvCalls() as calls:
        assert module(x).dtype == torch.float32
    assert calls.calls == [(torch.float32, torch.float32, False)]
    with torch.autocast("cpu", dtype=torch.float16), ConvCalls() as calls:
        assert module(x).dtype == torch.float16  # other autocast dtypes: autocast's own
    assert calls.calls == [(torch.float32, torch.float32, True)]


def test_mg_ssaf_runs_every_convolution_through_float32(monkeypatch, reference_dir):
    """The golden network under bfloat16 autocast on such a CPU: every convolution runs on
    float32 with autocast off, the logits are bfloat16 and as close to float32's as those of
    autocast's own bfloat16 convolutions, and training gets float32 gradients for every
    parameter."""
    model, golden = golden_model(reference_dir, "global050")
    model = model.to(memory_format=torch.channels_last)
    x = golden["input"]
    with torch.no_grad():
        _through_float32(monkeypatch, False)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            native = model(x)
    _through_float32(monkeypatch, True)
    with torch.autocast("cpu", dtype=torch.bfloat16), ConvCalls() as calls:
        got = model(x)
    assert len(calls.calls) > 20
    assert all(c == (torch.float32, torch.float32, False) for c in calls.calls)
    assert got.dtype == native.dtype == torch.bfloat16
    expected = golden["logits"].float()
    scale = expected.abs().max()
    error = (got.float() - expected).abs().max() / scale
    assert error < 0.02 and error <= 2 * (native.float() - expected).abs().max() / scale
    got.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32
               for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", ["depthwise 7x7", "pointwise", "stem 3x3 s2"])
def test_compiled_code_keeps_the_float32_path(monkeypatch, name):
    """Under torch.compile AOTAutograd traces the backward formulas under the forward's autocast:
    no convolution of the compiled forward or backward may take bfloat16 (PyTorch's generic
    code on these CPUs), and the outputs and gradients are eager's to bfloat16 round-off. The
    1x1 convolution takes its AVX2 path (matrix products in eager training) on any CPU."""
    _through_float32(monkeypatch, True)
    monkeypatch.setattr(pointwise, "_MATRIX_PRODUCT", True)
    factory, chans = MODULES[name]
    torch.manual_seed(0)
    module = factory().to(memory_format=torch.channels_last)
    x = torch.randn(2, chans, 14, 14).to(memory_format=torch.channels_last)
    grad = torch.randn(module(x).shape).bfloat16()
    expected = _run(module, x, grad)
    graphs = []

    def record(graph: torch.fx.GraphModule, example_inputs):
        graphs.append(graph)
        return make_boxed_func(graph)

    torch._dynamo.reset()
    got = _run(torch.compile(module, backend=aot_autograd(fw_compiler=record,
                                                          bw_compiler=record)), x, grad)
    assert len(graphs) == 2  # forward and backward
    convolutions = [node for graph in graphs for node in graph.graph.nodes
                    if node.target in (torch.ops.aten.convolution.default,
                                       torch.ops.aten.convolution_backward.default,
                                       torch.ops.aten.mm.default, torch.ops.aten.addmm.default)]
    assert convolutions
    for node in convolutions:
        dtypes = {arg.meta["val"].dtype for arg in node.args if isinstance(arg, torch.fx.Node)}
        assert dtypes == {torch.float32}, (node.format_node(), dtypes)
    for label, g, e in zip(["out", "x", "weight", "bias"], got, expected):
        assert g.dtype == e.dtype, label
        torch.testing.assert_close(g.float(), e.float(), rtol=2 ** -7,
                                   atol=2 ** -8 * e.abs().max().item(), msg=label)


def test_strided_depthwise_training_runs_through_float32_on_any_cpu(monkeypatch):
    """oneDNN's bfloat16 backward of a strided depthwise convolution is its generic grouped
    kernel (4-8x the float32 path at MG-SSAF-T's downsampling shapes): with grad, under bfloat16
    autocast, the downsampling's depthwise convolution runs through float32 also where the CPU
    has bfloat16 kernels; without grad, and stride 1, it stays autocast's bfloat16 convolution."""
    _through_float32(monkeypatch, False)
    strided, plain = MODULES["depthwise 3x3 s2"][0](), DepthwiseConv2d(32, 3)
    x = torch.randn(1, 32, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with ConvCalls() as calls:
            out = strided(x)
        assert out.dtype == torch.bfloat16
        assert calls.calls == [(torch.float32, torch.float32, False)]
        with torch.no_grad(), ConvCalls() as calls:
            strided(x)
        with ConvCalls() as more:
            plain(x)
    assert calls.calls == more.calls == [(torch.float32, torch.float32, True)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        program = torch.export.export(strided, (x,))
    assert _calls(program) == ["aten.conv2d.default"]  # no casts, no autocast region


def _calls(program) -> list[str]:
    return [str(n.target) for n in program.graph.nodes if n.op == "call_function"]


def test_float64_and_recorded_graphs_keep_the_plain_convolution(monkeypatch):
    """Only float32 and bfloat16 inputs take the float32 path (a float64 model is left alone, as
    autocast leaves it); torch.jit.trace and torch.export record the convolution itself."""
    _through_float32(monkeypatch, True)
    module = MODULES["stem 3x3 s2"][0]()
    x = torch.randn(1, 16, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert conv.bfloat16_through_float32(x)
        assert not conv.bfloat16_through_float32(x.double())
        double = copy.deepcopy(module).double()
        torch.testing.assert_close(double(x.double()), nn.Conv2d.forward(double, x.double()),
                                   rtol=0, atol=0)
        with ConvCalls() as calls:
            torch.jit.trace(module, (x,), check_trace=False)
        program = torch.export.export(module, (x,))
    assert calls.calls == [(torch.float32, torch.float32, True)]  # autocast's own, as recorded
    assert _calls(program) == ["aten.conv2d.default"]  # no casts, no autocast region


def test_every_convolution_of_the_networks_is_conv2d():
    """The backbone's convolutions (but AF's, which run as matrix products) and the UPerNet
    heads' are ``Conv2d``, so all of them take the float32 path."""
    from models.mg_ssaf import AttentionFusion
    from models.upernet import ConvBNReLU, _classifier

    model = timm.create_model("mg_ssaf_t")
    af = {id(m) for a in model.modules() if isinstance(a, AttentionFusion) for m in a}
    plain = [name for name, m in model.named_modules()
             if isinstance(m, nn.Conv2d) and not isinstance(m, Conv2d) and id(m) not in af]
    assert not plain, plain
    assert isinstance(ConvBNReLU(8, 8, 3)[0], Conv2d) and isinstance(_classifier(8, 3), Conv2d)


def test_the_network_runs_on_the_meta_device():
    """timm builds and runs models on ``meta`` (no autocast there): shapes only."""
    with torch.device("meta"):
        model = timm.create_model("mg_ssaf_t")
        out = model.forward_features(torch.randn(1, 3, 224, 224))
    assert out.device.type == "meta" and out.shape == (1, 768, 7, 7)
