"""models.separable: the fused SS-MSA + AF kernels give the PyTorch ops' numbers and gradients."""
import copy

import pytest
import torch

from models import build_model, ckernel, separable
from models.mg_ssaf import MGSSAFAttention
from config import load_config


def _attention(dim: int, heads: int, global_ratio: float, dtype=torch.float64):
    torch.manual_seed(0)
    attn = MGSSAFAttention(dim, heads, global_ratio, 2 if global_ratio else 0, 7).to(dtype)
    with torch.no_grad():
        for p in attn.attn_local_win.parameters():  # far from init, so every term counts
            p.normal_(0, 0.5)
    return attn


def _local(attn: MGSSAFAttention, shape, dtype=torch.float64) -> torch.Tensor:
    """The local block of a (B, H, W, 2*dim) projection: a strided view, as in forward()."""
    b, h, w, dim = shape
    qkv = torch.randn(b, h, w, 2 * dim, dtype=dtype)
    return qkv[..., :attn.local_channels]


def _run(attn: MGSSAFAttention, x: torch.Tensor, grad: torch.Tensor):
    return _run_with(attn.ss_msa, attn, x, grad)


def _run_with(ss_msa, attn: MGSSAFAttention, x: torch.Tensor, grad: torch.Tensor):
    x = x.detach().requires_grad_(True)
    params = list(attn.attn_local_win.parameters())
    out = ss_msa(x)
    return (out, *torch.autograd.grad(out, [x, *params], grad))


def _reference(attn, x, grad):
    with separable.pytorch_ops():
        assert not separable.fused_available(x, 7, attn.num_local, attn.attn_local_win)
        return _run(attn, x, grad)


@pytest.mark.parametrize("dim,heads,ratio,shape", [
    (96, 3, 0.0, (2, 14, 14, 96)),   # stage 0: local heads only
    (192, 6, 0.5, (1, 14, 21, 192)),  # stage 1: half the heads local; a non-square map
    (768, 24, 0.0, (1, 7, 14, 768)),  # 24 heads: the backward's largest scratch (T's stage 3)
])
def test_fused_matches_pytorch_ops_float64(dim, heads, ratio, shape):
    attn = _attention(dim, heads, ratio)
    x = _local(attn, shape)
    assert separable.fused_available(x, 7, attn.num_local, attn.attn_local_win)
    grad = torch.randn(*shape[:3], attn.num_local, attn.head_dim, dtype=torch.float64)
    got, expected = _run(attn, x, grad), _reference(attn, x, grad)
    for name, g, e in zip(["out", "x", "dw.weight", "dw.bias", "pw.weight", "pw.bias"],
                          got, expected):
        assert g.shape == e.shape, name
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12 * e.abs().max().item(), msg=name)
    with torch.no_grad():  # the inference kernel
        torch.testing.assert_close(attn.ss_msa(x), expected[0], rtol=1e-12,
                                   atol=1e-12 * expected[0].abs().max().item())


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("pool", ["openmp", "calling thread", "team of one"])
def test_any_thread_count_on_any_pool(request, monkeypatch, threads, pool):
    """Units (windows) split unevenly over threads (20 windows), on PyTorch's OpenMP pool, on
    the calling thread alone, or on an OpenMP team smaller than asked for."""
    record = None
    if pool == "calling thread":
        monkeypatch.setattr(ckernel, "openmp_pool", lambda: (None, None, None))
    elif pool == "team of one":
        request.getfixturevalue("one_thread_openmp_team")
    else:
        record = request.getfixturevalue("recording_openmp_pool")
    attn = _attention(96, 3, 0.0)
    x = _local(attn, (2, 14, 35, 96))
    grad = torch.randn(2, 14, 35, 3, 32, dtype=torch.float64)
    expected = _reference(attn, x, grad)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = _run(attn, x, grad)
    finally:
        torch.set_num_threads(previous)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12 * e.abs().max().item())
    if record is not None:  # every thread asked for did work, in the forward and the backward
        assert record.launches == 2
        assert record.thread_numbers == (set(range(threads)) if threads > 1 else set())


def test_float32_and_inference():
    attn = _attention(96, 3, 0.0, torch.float32)
    x = _local(attn, (2, 14, 14, 96), torch.float32)
    grad = torch.randn(2, 14, 14, 3, 32)
    got, expected = _run(attn, x, grad), _reference(attn, x, grad)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5 * e.abs().max().item())
    with torch.no_grad():  # the same forward kernel, keeping R and C in scratch
        torch.testing.assert_close(attn.ss_msa(x), got[0], rtol=0, atol=0)


def test_inference_kernel_matches_the_pytorch_ops_and_is_a_custom_op():
    """Without grad, one kernel pass per window (``mgssaf::separable_attention_inference``):
    the PyTorch ops' numbers in float64 (24 heads: the largest scratch, MG-SSAF-T's last stage),
    bf16 autocast's within its round-off, and the custom op's transforms (opcheck, make_fx,
    vmap, the FLOP counter, torch.compile)."""
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.utils.flop_counter import FlopCounterMode

    attn = _attention(768, 24, 0.0).requires_grad_(False)
    x = _local(attn, (2, 7, 14, 768))
    with separable.pytorch_ops():
        expected = attn.ss_msa(x)
    torch.testing.assert_close(attn.ss_msa(x), expected, rtol=1e-12,
                               atol=1e-12 * expected.abs().max().item())
    params = list(attn.attn_local_win.parameters())
    torch.library.opcheck(torch.ops.mgssaf.separable_attention_inference.default,
                          (x.contiguous(), 7, 24, attn.scale, *params))
    traced = make_fx(lambda t: attn.ss_msa(t))(x)
    assert _kernel_calls(traced.graph) == ["mgssaf.separable_attention_inference.default"]
    batch = torch.stack([x, 2 * x])
    torch.testing.assert_close(torch.func.vmap(attn.ss_msa)(batch),
                               torch.stack([expected, attn.ss_msa(2 * x)]), rtol=1e-12,
                               atol=1e-12)
    with FlopCounterMode(display=False) as counter:
        attn.ss_msa(x)
    assert counter.get_total_flops() > 0
    attn32 = _attention(192, 6, 0.5, torch.float32)
    x32 = _local(attn32, (2, 14, 21, 192), torch.float32).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        trained = attn32.ss_msa(x32)  # the training forward: the parameters require grad
        with torch.no_grad():
            got = attn32.ss_msa(x32)
            compiled = torch.compile(attn32.ss_msa)(x32)
    assert got.dtype == compiled.dtype == torch.bfloat16
    for result in (got, compiled):
        torch.testing.assert_close(result.float(), trained.float(), rtol=2 ** -7,
                                   atol=2 ** -8 * trained.abs().max().item())


def _assert_float32_as_close_as_pytorchs(attn: MGSSAFAttention, scale: float = 1.0) -> None:
    """Float32 kernels against float64 ops, on a projection ``scale`` times the usual, are no
    further off than float32 ops are (or within 1e-6 of the largest value; 5e-6 for the 3x3's
    gradients, sums over every map entry in another order)."""
    x = _local(attn, (1, 14, 14, 96)) * scale
    grad = torch.randn(1, 14, 14, 3, 32, dtype=torch.float64)
    exact = _reference(attn, x, grad)
    attn32 = copy.deepcopy(attn).float()
    fused = _run(attn32, x.float(), grad.float())
    ops = _reference(attn32, x.float(), grad.float())
    for name, f, o, e in zip(["out", "x", "dw.weight", "dw.bias"], fused, ops, exact):
        scale = e.abs().max()
        error, ops_error = ((t.double() - e).abs().max() / scale for t in (f, o))
        floor = 5e-6 if name.startswith("dw") else 1e-6  # sums over every map entry
        assert error <= max(2 * ops_error, floor), (name, error.item(), ops_error.item())


# |Y| <= 1 takes the series, the rest the erfc; -1 is the series' worst case
@pytest.mark.parametrize("bias", [-9.0, -3.0, -1.01, -1.0, -0.7, 0.0, 0.3, 1.0, 1.01, 2.5, 8.0])
def test_float32_gelu_is_as_close_to_float64_as_pytorchs(bias):
    """The kernels' float32 GELU (series or vectorised erfc) and its derivative: with AF's 3x3
    weights zero, Y is its bias everywhere, so the output and the bias's gradient go through
    GELU and GELU' at that value."""
    attn = _attention(96, 3, 0.0)
    dw = attn.attn_local_win[0]
    with torch.no_grad():
        dw.weight.zero_()
        dw.bias.fill_(bias)
    _assert_float32_as_close_as_pytorchs(attn)


def test_float32_gelu_mixes_series_and_erfc_within_a_map():
    """A small projection makes the attention nearly uniform (P about 1/49) and equal 3x3 weights
    w = 7 make Y vary by key: 7/49 times the key's neighbours inside the window, 0.57 at the
    corners, 0.86 along the edges, 1.29 inside. The kernels keep each map key-major (a key's 49
    queries, padded to 56 with Y = the bias, 0), so that runs of 64 values over the first and
    last rows of keys take the series and the others the erfc, forward and backward."""
    attn = _attention(96, 3, 0.0)
    dw = attn.attn_local_win[0]
    with torch.no_grad():
        dw.weight.fill_(7.0)
        dw.bias.zero_()
    seen = []
    attn.attn_local_win[1].register_forward_hook(lambda m, args, out: seen.append(args[0]))
    _assert_float32_as_close_as_pytorchs(attn, scale=1e-3)
    # the GELU input of the float64 ops, (heads, windows, query, key), in the kernels' layout
    y = seen[0].reshape(3, -1, 49, 49).transpose(-1, -2)
    runs = torch.nn.functional.pad(y, (0, 7)).flatten(2).split(64, dim=-1)
    series = torch.stack([(run.abs() <= 1).all(dim=-1) for run in runs], dim=-1)
    assert 0.05 < series.float().mean() < 0.5, series.float().mean()


@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16])
def test_bfloat16_autocast_matches_float32_within_bfloat16_round_off(input_dtype):
    """Under CPU autocast to bfloat16 the kernels take bfloat16 (or float32) activations, sum in
    float32 and return bfloat16, as the PyTorch ops do under autocast; outputs and gradients
    (input and AF parameters) agree with the float32 kernels on the same bf16-rounded input to
    bf16 round-off, and are closer to them than the PyTorch ops under autocast are."""
    attn = _attention(192, 6, 0.5, torch.float32)
    x = _local(attn, (2, 14, 21, 192), torch.float32).bfloat16().float()
    grad = torch.randn(2, 14, 21, 3, 32)
    expected = _run(attn, x, grad)  # float32 kernels
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert separable.fused_available(x.to(input_dtype), 7, 3, attn.attn_local_win)
        got = _run(attn, x.to(input_dtype), grad)
        with separable.pytorch_ops():
            ops = _run(attn, x.to(input_dtype), grad)
    assert got[0].dtype == ops[0].dtype == torch.bfloat16
    assert got[1].dtype == input_dtype
    names = ["out", "x", "dw.weight", "dw.bias", "pw.weight", "pw.bias"]
    for name, g, o, e in zip(names, got, ops, expected):
        assert g.dtype == o.dtype, name
        error = (g.float() - e).abs().max() / e.abs().max()
        assert error < 1e-2, (name, error.item())
        assert error <= (o.float() - e).abs().max() / e.abs().max(), name


def _rounded_once(got: torch.Tensor, exact: torch.Tensor) -> None:
    """``got`` (bf16) is ``exact`` (float32) rounded to nearest even, as torch rounds: equal
    but where the two builds' float32 sums differ in their last bits and the rounding flips
    (the compiler may order a sum differently in each), then by one bf16 step."""
    rounded = exact.bfloat16()
    assert got.dtype == torch.bfloat16
    assert (got != rounded).float().mean() < 0.01  # truncation would miss about half
    torch.testing.assert_close(got.float(), rounded.float(), rtol=2 ** -7, atol=0)


def test_bfloat16_activations_are_the_float32_kernels_numbers_rounded_once():
    """The kernels for bf16 activations read them into float32 and compute what the float32
    kernels compute on the same values: output and input gradient (k's two parts summed before
    the one rounding) are the float32 kernels', rounded to bf16 once; the maps and parameter
    gradients are theirs. Under autocast the op takes the bf16 projection itself: no float32
    copy of it is made or saved."""
    attn = _attention(192, 6, 0.5, torch.float32)
    x = _local(attn, (2, 14, 21, 192), torch.float32).bfloat16().contiguous()
    grad = torch.randn(2, 14, 21, 3, 32).bfloat16()
    params = [p.detach() for p in attn.attn_local_win.parameters()]
    ops = torch.ops.mgssaf
    out16, *maps16 = ops.separable_attention(x, 7, 3, attn.scale, *params)
    out32, *maps32 = ops.separable_attention(x.float(), 7, 3, attn.scale, *params)
    assert all(m.dtype == torch.float32 for m in maps16)
    _rounded_once(out16, out32)
    for m16, m32 in zip(maps16, maps32):
        torch.testing.assert_close(m16, m32, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ops.separable_attention_inference(x, 7, 3, attn.scale, *params),
                               out16, rtol=0, atol=0)
    grads16 = ops.separable_attention_backward(grad, x, *maps16, *params, 7, 3, attn.scale)
    grads32 = ops.separable_attention_backward(grad.float(), x.float(), *maps32, *params, 7, 3,
                                               attn.scale)
    _rounded_once(grads16[0], grads32[0])
    for g16, g32 in zip(grads16[1:], grads32[1:]):
        torch.testing.assert_close(g16, g32, rtol=1e-5, atol=1e-5 * g32.abs().max().item())
    with pytest.raises(TypeError, match="dout is torch.float32, expected torch.bfloat16"):
        ops.separable_attention_backward(grad.float(), x, *maps16, *params, 7, 3, attn.scale)

    from torch.fx.experimental.proxy_tensor import make_fx
    with torch.autocast("cpu", dtype=torch.bfloat16):
        graph = make_fx(lambda t: attn.ss_msa(t))(x).graph
    kernel = [n for n in graph.nodes if "mgssaf" in str(n.target)]
    assert len(kernel) == 1 and kernel[0].args[0].op == "placeholder"  # x itself, not a copy


def test_parameter_gradients_keep_the_parameters_strides():
    """DDP's buckets expect each gradient in its parameter's strides (channels-last here)."""
    model = build_model(load_config("configs/MG-SSAF/MG-SSAF-T.yaml"))
    model = model.to(memory_format=torch.channels_last)
    model(torch.randn(1, 3, 224, 224)).sum().backward()
    af = model.layers[0].blocks[0].attn.attn_local_win
    for name, p in af.named_parameters():
        assert p.grad is not None and p.grad.stride() == p.stride(), name


def test_where_it_does_not_apply_the_pytorch_ops_run(monkeypatch):
    attn = _attention(96, 3, 0.0, torch.float32)
    af = attn.attn_local_win
    padded = _local(attn, (1, 10, 10, 96), torch.float32)  # 10 is no multiple of the window
    assert not separable.fused_available(padded, 7, 3, af)
    x = _local(attn, (1, 14, 14, 96), torch.float32)
    with torch.autocast("cpu", dtype=torch.float16):  # autocast to bfloat16 only
        assert not separable.fused_available(x, 7, 3, af)
    assert not separable.fused_available(x.double(), 7, 3, af)  # parameters in another dtype
    monkeypatch.setattr(ckernel, "_libraries", {})
    monkeypatch.setattr(ckernel, "_build", lambda name, source, flags: None)  # no C compiler
    assert not separable.fused_available(x, 7, 3, af)
    assert attn.ss_msa(padded).shape == (1, 10, 10, 3, 32)


def _kernel_calls(graph) -> list[str]:
    return [str(n.target) for n in graph.nodes if "mgssaf" in str(n.target)]


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::torch.jit.TracerWarning")
def test_tracers_transforms_and_modes_keep_the_kernels_where_they_apply():
    """The kernels are custom ops: make_fx records them as single ops (the graph replays the
    same numbers), vmap, fake tensors and the FLOP counter go through them; torch.jit.trace, whose
    graphs run elsewhere, gets the PyTorch ops."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.utils.flop_counter import FlopCounterMode
    attn = _attention(96, 3, 0.0)
    x = _local(attn, (1, 14, 14, 96)).contiguous()
    with separable.pytorch_ops():
        expected = attn.ss_msa(x)
    traced = make_fx(lambda t: attn.ss_msa(t))(x)
    assert _kernel_calls(traced.graph) == ["mgssaf.separable_attention.default"]
    torch.testing.assert_close(traced(x), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.func.vmap(attn.ss_msa)(torch.stack([x, 2 * x])),
                               torch.stack([expected, attn.ss_msa(2 * x)]), rtol=1e-12,
                               atol=1e-12)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:  # real parameters, fake input
        assert attn.ss_msa(mode.from_tensor(x)).shape == expected.shape
    with FlopCounterMode(display=False) as counter:
        attn.ss_msa(x.requires_grad_(True)).sum().backward()
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    assert counts["mgssaf.separable_attention"] > 0
    assert counts["mgssaf.separable_attention_backward"] > counts["mgssaf.separable_attention"]
    attn.requires_grad_(False)  # the parameters become the trace's constants
    traced = torch.jit.trace(lambda t: attn.ss_msa(t), x.detach())
    assert not [n for n in traced.inlined_graph.nodes() if "mgssaf" in n.kind()]
    torch.testing.assert_close(traced(x.detach()), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bf16-autocast"])
def test_torch_compile_keeps_the_kernels(recording_openmp_pool, autocast):
    """Compiled, SS-MSA + AF runs the kernels (forward and backward), with eager's numbers and
    gradients, in float32 and under bf16 autocast."""
    attn = _attention(96, 3, 0.0, torch.float32)
    x = _local(attn, (2, 14, 14, 96), torch.float32)
    grad = torch.randn(2, 14, 14, 3, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        expected = _run(attn, x, grad)
        compiled = torch.compile(attn.ss_msa)
        for _ in range(2):  # the first call compiles
            launches = recording_openmp_pool.launches
            got = _run_with(compiled, attn, x, grad)
    assert recording_openmp_pool.launches - launches == 2  # the forward and backward kernels
    for g, e in zip(got, expected):
        assert g.dtype == e.dtype
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5 * e.abs().max().item())


def test_custom_ops_pass_opcheck():
    attn = _attention(96, 3, 0.0)
    x = _local(attn, (1, 7, 14, 96)).requires_grad_(True)
    params = [p.detach().requires_grad_(True) for p in attn.attn_local_win.parameters()]
    torch.library.opcheck(torch.ops.mgssaf.separable_attention.default,
                          (x, 7, 3, attn.scale, *params))


def test_the_forward_keeps_only_the_attention_for_the_backward():
    """The forward op returns, besides the output, only the row and column attention
    ``(heads, windows, N*w)``: the backward recomputes P, Y, GELU(Y) and Wt from them in cache
    (four maps of ``(heads, windows, N*NQ)`` were saved and read back: 17 MB each in a stage-0
    block of MG-SSAF-T at batch 8). They are 3-D, real and fake: Inductor gives the 4-D tensors
    of a graph with convolutions a channels-last order, and copied 4-D maps into it after the
    forward and back before the backward."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    attn = _attention(96, 3, 0.0)
    x = _local(attn, (1, 7, 14, 96))
    params = list(attn.attn_local_win.parameters())
    _, *maps = torch.ops.mgssaf.separable_attention(x, 7, 3, attn.scale, *params)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        _, *fake_maps = torch.ops.mgssaf.separable_attention(mode.from_tensor(x), 7, 3,
                                                             attn.scale, *params)
    assert len(maps) == len(fake_maps) == 2  # rows, columns
    for real, fake in zip(maps, fake_maps):
        assert real.shape == fake.shape == (3, 2, 49 * 7) and real.stride() == fake.stride()


def test_the_backward_fills_no_gradient_for_the_maps():
    """The attention maps the forward op returns are the backward's inputs, not results: they
    carry no gradient, and autograd fills no zero gradient for them (when the forward returned
    four larger maps too, their fills took 26 ms of a 87 ms forward and backward of a stage-0
    block of MG-SSAF-T at batch 8)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class LargeWrites(TorchDispatchMode):
        def __init__(self, numel: int) -> None:
            super().__init__()
            self.numel, self.seen = numel, []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket in (torch.ops.aten.fill_, torch.ops.aten.zero_,
                                       torch.ops.aten.zeros, torch.ops.aten.zeros_like,
                                       torch.ops.aten.new_zeros):
                if isinstance(out, torch.Tensor) and out.numel() >= self.numel:
                    self.seen.append(func)
            return out

    attn = _attention(96, 3, 0.0)
    x = _local(attn, (1, 7, 14, 96)).requires_grad_(True)
    params = list(attn.attn_local_win.parameters())
    out, *maps = torch.ops.mgssaf.separable_attention(x, 7, 3, attn.scale, *params)
    assert out.requires_grad and not any(m.requires_grad for m in maps)
    with LargeWrites(min(m.numel() for m in maps)) as mode:
        out.sum().backward()
    assert mode.seen == [] and x.grad is not None


def test_an_unloadable_cached_kernel_falls_back(monkeypatch, tmp_path, caplog):
    """A truncated .so in the cache (or a noexec mount) gives the PyTorch ops and a warning."""
    bad = tmp_path / "ssmsa_truncated.so"
    bad.write_bytes(b"not a shared library")
    monkeypatch.setattr(ckernel, "_libraries", {})
    monkeypatch.setattr(ckernel, "_build", lambda name, source, flags: str(bad))
    attn = _attention(96, 3, 0.0, torch.float32)
    x = _local(attn, (1, 14, 14, 96), torch.float32)
    assert not separable.fused_available(x, 7, 3, attn.attn_local_win)
    assert f"cannot load {bad}" in caplog.text and "using PyTorch ops instead" in caplog.text
    assert attn.ss_msa(x).shape == (1, 14, 14, 3, 32)


def test_direct_calls_where_no_kernel_applies_are_refused():
    attn = _attention(96, 3, 0.0, torch.float32)
    padded = _local(attn, (1, 10, 10, 96), torch.float32)
    with pytest.raises(ValueError, match=r"no fused kernel for a \(1, 10, 10, 192\)"):
        separable.separable_attention(padded, 7, 3, attn.scale, attn.attn_local_win)
