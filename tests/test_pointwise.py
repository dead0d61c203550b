"""models.pointwise: PointwiseConv2d computes nn.Conv2d's 1x1 convolution, on AVX2 CPUs as a
matrix product of the channels-last map, elsewhere through oneDNN."""
import pytest
import torch
from torch import nn
from torch.profiler import profile
from torch.utils.flop_counter import FlopCounterMode

from models import pointwise
from models.pointwise import PointwiseConv2d

from helpers import ConvCalls


@pytest.fixture(params=[True, False], ids=["matrix-product", "onednn"])
def matrix_product(request, monkeypatch):
    """Both ways of computing the convolution, on any CPU (the module picks one by the
    instruction set PyTorch dispatches to)."""
    monkeypatch.setattr(pointwise, "_MATRIX_PRODUCT", request.param)
    return request.param


def _pair(dtype=torch.float32, bias=True):
    torch.manual_seed(0)
    native, fast = nn.Conv2d(32, 48, 1, bias=bias), PointwiseConv2d(32, 48, bias=bias)
    fast.load_state_dict(native.state_dict())
    return native.to(dtype), fast.to(dtype)


def _grads(conv, x, grad):
    x = x.detach().clone().requires_grad_(True)
    out = conv(x)
    params = [p for p in (conv.weight, conv.bias) if p is not None]
    return (out, *torch.autograd.grad(out, (x, *params), grad))


def _ops(fn) -> set[str]:
    with profile() as prof:
        fn()
    return {event.key for event in prof.key_averages()}


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch", [2, 17])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_conv2d(matrix_product, layout, dtype, batch, bias):
    native, fast = _pair(dtype, bias)
    x = torch.randn(batch, 32, 6, 7, dtype=dtype).contiguous(memory_format=layout)
    grad = torch.randn(batch, 48, 6, 7, dtype=dtype)
    got, expected = _grads(fast, x, grad), _grads(native, x, grad)
    assert got[0].is_contiguous(memory_format=layout)
    tol = 1e-6 if dtype == torch.float32 else 1e-14  # sums of up to 714 terms: relative to max
    for name, g, e in zip(("output", "input", "weight", "bias"), got, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=tol * e.abs().max().item(), msg=name)


def test_runs_as_a_matrix_product(matrix_product):
    """Training on channels-last maps on AVX2 CPUs: forward and backward are matrix products,
    without a convolution; elsewhere oneDNN's convolution and its backward. Inference, a frozen
    weight and maps that are not channels-last are convolved either way."""
    _, fast = _pair()
    x = torch.randn(2, 32, 6, 7).contiguous(memory_format=torch.channels_last)
    ops = _ops(lambda: fast(x).sum().backward())
    assert ("aten::convolution" in ops) != matrix_product
    assert ("aten::convolution_backward" in ops) != matrix_product
    assert ("aten::addmm" in ops and "aten::mm" in ops) == matrix_product
    assert "aten::convolution" in _ops(lambda: fast(x.contiguous()).sum().backward())
    with torch.no_grad():
        assert "aten::convolution" in _ops(lambda: fast(x))
    fast.requires_grad_(False)
    assert "aten::convolution" in _ops(lambda: fast(x.requires_grad_(True)).sum().backward())


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_weight_gradient_keeps_the_weight_strides(matrix_product, layout):
    """The matrix product's weight gradient has the weight's strides (DDP's gradient buckets
    expect them); oneDNN's has nn.Conv2d's (which, with 2 or more threads, are channels-last's
    whatever the weight's layout)."""
    native, fast = _pair()
    native, fast = native.to(memory_format=layout), fast.to(memory_format=layout)
    x = torch.randn(2, 32, 6, 7).contiguous(memory_format=torch.channels_last)
    for conv in (native, fast):
        conv(x).square().sum().backward()
    expected = fast.weight.stride() if matrix_product else native.weight.grad.stride()
    assert fast.weight.grad.stride() == expected


@pytest.mark.parametrize("frozen", ["input", "weight", "bias"])
def test_gradients_of_what_requires_grad(matrix_product, frozen):
    """A frozen weight or bias, or an input without grad (the stem's images), gets the same
    gradients as nn.Conv2d for the rest."""
    native, fast = _pair()
    x = torch.randn(2, 32, 6, 7).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(2, 48, 6, 7).contiguous(memory_format=torch.channels_last)
    results = []
    for conv in (native, fast):
        inputs = {"input": x.clone().requires_grad_(True), "weight": conv.weight,
                  "bias": conv.bias}
        getattr(conv, frozen, inputs[frozen]).requires_grad_(False)
        inputs.pop(frozen)
        out = conv(x if frozen == "input" else inputs["input"])
        results.append(torch.autograd.grad(out, list(inputs.values()), grad))
    for g, e in zip(*results):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-6 * e.abs().max().item())


def test_output_may_be_changed_in_place(matrix_product):
    """As nn.Conv2d's, e.g. by an in-place activation or residual sum."""
    native, fast = _pair()
    x = torch.randn(2, 32, 6, 7).contiguous(memory_format=torch.channels_last)
    grads = []
    for conv in (native, fast):
        out = conv(x)
        out.add_(1.0).relu_()
        out.square().sum().backward()
        grads.append(conv.weight.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=0,
                               atol=1e-6 * grads[0].abs().max().item())


def test_one_pixel_maps(matrix_product):
    """(B, C, 1, 1) maps, as the classifier head's 1x1 convolution gets them."""
    native, fast = _pair()
    x = torch.randn(4, 32, 1, 1).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(4, 48, 1, 1)
    for name, g, e in zip(("output", "input", "weight", "bias"), _grads(fast, x, grad),
                          _grads(native, x, grad)):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5, msg=name)


def test_bfloat16_autocast():
    native, fast = _pair()
    x = torch.randn(2, 32, 5, 7).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, expected = fast(x), native(x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected, rtol=1e-2, atol=1e-2)


def test_pieces():
    assert [pointwise._pieces(8, h) for h in (56, 28, 14, 7)] == [2, 2, 2, 7]
    assert pointwise._pieces(4, 5) == 5 and pointwise._pieces(1, 12) == 12
    assert pointwise._pieces(3, 12) == 6 and pointwise._pieces(16, 7) == 1


@pytest.mark.skipif(not pointwise._ONEDNN_FASTER, reason="plain nn.Conv2d without AVX2")
@pytest.mark.parametrize("height", [5, 8])
def test_single_thread_small_batch_runs_on_onednn(monkeypatch, height):
    """Where the convolution is oneDNN's (not a matrix product), the case PyTorch would send to
    its slower native kernel (1 thread, batch < 16): here a batch of 4 x 5 one-row images or of
    4 x 4 images of two rows, forward and backward."""
    monkeypatch.setattr(pointwise, "_MATRIX_PRODUCT", False)
    _, fast = _pair()
    x = torch.randn(4, 32, height, 7).contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ops = _ops(lambda: fast(x).sum().backward())
    finally:
        torch.set_num_threads(threads)
    assert "aten::mkldnn_convolution" in ops
    assert not any(op.startswith("aten::_slow_conv2d") for op in ops), ops


@pytest.mark.skipif(not pointwise._ONEDNN_FASTER, reason="plain nn.Conv2d without AVX2")
def test_the_batch_view_only_where_pytorch_would_use_its_own_kernel(monkeypatch):
    """The batch view is for float32 on one thread: with more threads, and for bfloat16
    convolutions, PyTorch calls oneDNN itself, and the plain convolution is the faster one."""
    from torch.overrides import TorchFunctionMode

    class Batches(TorchFunctionMode):
        def __init__(self) -> None:
            super().__init__()
            self.seen = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.nn.functional.conv2d:
                self.seen.append(args[0].shape[0])
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(pointwise, "_MATRIX_PRODUCT", False)
    monkeypatch.setattr("models.conv._BFLOAT16_NATIVE", True)  # else bf16 runs through float32
    _, fast = _pair()
    x = torch.randn(4, 32, 8, 7).contiguous(memory_format=torch.channels_last)

    def batches(threads: int, bfloat16: bool) -> list[int]:
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            with Batches() as mode, torch.autocast("cpu", dtype=torch.bfloat16,
                                                   enabled=bfloat16):
                fast(x)
        finally:
            torch.set_num_threads(previous)
        return mode.seen

    assert batches(1, False) == [16]  # 4 images as 16 of 2 rows
    assert batches(2, False) == batches(1, True) == [4]


def test_gradcheck_and_gradgradcheck_float64(monkeypatch):
    """Plain ATen ops: first and second derivatives (e.g. a gradient penalty) are exact."""
    monkeypatch.setattr(pointwise, "_MATRIX_PRODUCT", True)
    torch.manual_seed(0)
    conv = PointwiseConv2d(8, 6).double()
    x = torch.randn(3, 8, 4, 5, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(6, 8, 1, 1, dtype=torch.float64).contiguous(
        memory_format=torch.channels_last)
    bias = torch.randn(6, dtype=torch.float64)
    inputs = tuple(t.requires_grad_(True) for t in (x, weight, bias))
    assert "aten::addmm" in _ops(lambda: conv.convolve(*inputs))
    assert torch.autograd.gradcheck(conv.convolve, inputs)
    assert torch.autograd.gradgradcheck(conv.convolve, inputs)


def test_torch_compile_keeps_the_matrix_product(monkeypatch):
    """Compiled training runs the matrix products (no convolution) and matches eager, the
    weight gradient in the channels-last weight's strides."""
    monkeypatch.setattr(pointwise, "_MATRIX_PRODUCT", True)
    _, fast = _pair()
    fast = fast.to(memory_format=torch.channels_last)
    x = torch.randn(2, 32, 6, 7).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(2, 48, 6, 7).contiguous(memory_format=torch.channels_last)
    expected = _grads(fast, x, grad)
    torch._dynamo.reset()
    compiled = torch.compile(fast)
    _grads(compiled, x, grad)  # compiles
    ops = _ops(lambda: _grads(compiled, x, grad))
    assert "aten::mm" in ops and not any("convolution" in op for op in ops), ops
    for name, g, e in zip(("output", "input", "weight", "bias"), _grads(compiled, x, grad),
                          expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5, msg=name)
    fast.weight.grad = None
    compiled(x).square().sum().backward()
    assert fast.weight.grad.stride() == fast.weight.stride() == (32, 1, 32, 32)


@pytest.mark.parametrize("input_grad", [True, False])
def test_flop_counter_counts_a_convolutions_flops(matrix_product, input_grad):
    """FLOP counts are those of nn.Conv2d: the forward, and in training the weight gradient and
    (only when the input requires grad) the input gradient, a forward's each."""
    native, fast = _pair()
    x = torch.randn(2, 32, 6, 7).contiguous(memory_format=torch.channels_last)
    counts = []
    for conv in (native, fast):
        with FlopCounterMode(display=False) as counter:
            conv(x.clone().requires_grad_(input_grad)).sum().backward()
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] == (3 if input_grad else 2) * 2 * 2 * 32 * 48 * 6 * 7


@pytest.mark.skipif(not pointwise._MATRIX_PRODUCT,
                    reason="PyTorch runs no AVX2 code here (or has no MKL): oneDNN's convolution")
def test_this_cpu_takes_the_matrix_product_in_mg_ssaf():
    """Unpatched, as users run it: every 1x1 convolution of an MG-SSAF training step on this AVX2
    CPU is a matrix product."""
    import timm

    import models  # noqa: F401  (registers mg_ssaf_t)

    model = timm.create_model("mg_ssaf_t", img_size=64, depths=(1, 1, 1, 1))
    model = model.to(memory_format=torch.channels_last)
    pointwise_convs = sum(isinstance(m, PointwiseConv2d) for m in model.modules())
    with ConvCalls() as calls:
        model(torch.randn(2, 3, 64, 64)).sum().backward()
    assert calls.matrix_products == pointwise_convs


def test_recorded_graphs_hold_the_plain_convolution(monkeypatch):
    """torch.export and torch.jit.trace record ATen's convolution (with grad enabled)."""
    monkeypatch.setattr(pointwise, "_MATRIX_PRODUCT", True)
    _, fast = _pair()
    x = torch.randn(2, 32, 6, 7).contiguous(memory_format=torch.channels_last)
    program = torch.export.export(fast, (x,))
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert targets == {"aten.conv2d.default"}, targets
    traced = torch.jit.trace(fast, (x,), check_trace=False)
    assert "linear" not in str(traced.graph) and "_convolution" in str(traced.graph)
