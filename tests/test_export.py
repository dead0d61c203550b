"""Export: torch.export with a dynamic batch and dynamic sides, torch.jit.trace, and
tools/export.py (ONNX through the dynamo exporter, run by onnxruntime; safetensors + JSON config,
read back by build_model and by timm). Small networks: the same code as T/S/B."""
import json
import os

import pytest
import timm
import torch
from torch.export import Dim

from config import load_config
from models import build_model, model_kwargs
from helpers import CFG, TINY_MODEL, run_cli

# a small MG-SSAF whose stages 1 and 2 have global heads (window and strip pooling)
SMALL = dict(embed_dim=24, depths=(1, 1, 1, 1), num_heads=(1, 6, 6, 2), head_hidden_dim=64,
             num_classes=10)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("mg_ssaf_t", **SMALL).eval()


def _images(batch: int, height: int, width: int) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(batch))


@pytest.mark.slow
def test_export_dynamic_batch():
    """Exported at batch 2, the program runs at batch 5 with eager's logits (the pointwise
    convolution's batch-dependent views stand aside under export). The program holds standard
    ATen ops only: the fused SS-MSA and depthwise custom ops give way to their reference ops."""
    model = _model()
    program = torch.export.export(model, (_images(2, 64, 96),),
                                  dynamic_shapes={"x": {0: Dim("batch", min=1, max=1024)}})
    ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    ops -= {t for t in ops if t.startswith("<built-in function")}  # size arithmetic
    assert ops and all(t.startswith("aten.") for t in ops), ops
    x = _images(5, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_export_dynamic_height_and_width():
    """Dynamic batch and sides (multiples of 32): exported at 224x224, where the last stage is
    one window across, the program runs at 256x320, whose stage maps need window padding (and
    whose last stage is two windows across), and at 448x448 with eager's logits, at batch 1
    too (the exporter assumes dynamic sizes of at least 2: the strip pooling and the AF's views
    are written so that it keeps no guard that holds from batch 2 only)."""
    model = _model()
    side = dict(min=7, max=64)  # 224 .. 2048 pixels
    program = torch.export.export(model, (_images(2, 224, 224),), dynamic_shapes={
        "x": {0: Dim("batch", min=1, max=1024), 2: 32 * Dim("h", **side),
              3: 32 * Dim("w", **side)}})
    with torch.no_grad():
        for x in (_images(3, 256, 320), _images(2, 448, 448), _images(1, 448, 448),
                  _images(1, 256, 320), _images(1, 224, 224)):
            torch.testing.assert_close(program.module()(x), model(x), rtol=1e-5, atol=1e-5)


def test_jit_trace_is_the_same_with_and_without_grad():
    """torch.jit.trace records one graph whether grad is on or off (the depthwise fast backward
    stands aside), free of the example's batch (so are the pointwise views): it runs at
    another batch with eager's logits."""
    model = _model()
    example = _images(2, 64, 96)
    traced = torch.jit.trace(model, (example,), check_trace=False)
    with torch.no_grad():
        traced_no_grad = torch.jit.trace(model, (example,), check_trace=False)
    ops, ops_no_grad = ([node.kind() for node in t.inlined_graph.nodes()]
                        for t in (traced, traced_no_grad))
    assert ops == ops_no_grad
    x = _images(5, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.cli
@pytest.mark.slow
def test_export_tool_onnx_and_safetensors(tmp_path):
    """tools/export.py writes the ONNX file with its weights beside it in ``.onnx.data``, and
    says so (onnxruntime gives eager's logits at batch 1 and 3), and the safetensors + JSON
    config that build_model and timm's pretrained file overlay read back to the same network."""
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from tools.export import load_exported_config

    opts = [*TINY_MODEL, "DATA.IMG_SIZE", "64"]
    torch.manual_seed(0)
    checkpoint = tmp_path / "ckpt.pth"
    reference = build_model(load_config(CFG, opts)).eval()
    torch.save({"model": reference.state_dict()}, checkpoint)
    done = run_cli(["tools/export.py", "--cfg", CFG, "--checkpoint", str(checkpoint),
                    "--output", str(tmp_path / "out"), "--opts", *opts], prefix=(), timeout=600)
    assert done.returncode == 0, done.stdout
    stem = tmp_path / "out" / "mg_ssaf_test"
    assert "onnxruntime, batch 3: max |logit difference| from PyTorch" in done.stdout
    assert (f"wrote {stem}.onnx (input 'images' (batch, 3, 64, 64), dynamic batch) and its "
            f"weights {stem}.onnx.data (keep the two files together)") in done.stdout
    assert os.path.getsize(f"{stem}.onnx") > 0 and os.path.getsize(f"{stem}.onnx.data") > 0

    session = onnxruntime.InferenceSession(f"{stem}.onnx", providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        x = _images(batch, 64, 64)
        (logits,) = session.run(None, {"images": x.numpy()})
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(logits), reference(x), rtol=1e-4,
                                       atol=1e-5)

    config = load_exported_config(f"{stem}.json")
    assert json.loads(open(f"{stem}.json").read())["MODEL"]["NAME"] == "mg_ssaf_test"
    assert config.MODEL.MGSSAF.EMBED_DIM == 24 and config.DATA.IMG_SIZE == 64
    assert load_exported_config(f"{stem}.safetensors") == config
    from safetensors.torch import load_file
    rebuilt = build_model(config).eval()
    rebuilt.load_state_dict(load_file(f"{stem}.safetensors"))
    through_timm = timm.create_model(
        "mg_ssaf_t", pretrained=True, **model_kwargs(config),
        pretrained_cfg_overlay=dict(file=f"{stem}.safetensors",
                                    num_classes=config.MODEL.NUM_CLASSES)).eval()
    x = _images(2, 64, 64)
    with torch.no_grad():
        for model in (rebuilt, through_timm):
            torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)


@pytest.mark.cli
def test_export_tool_refuses_a_segmentation_config(tmp_path):
    """A segmentation config would build an MG-SSAF classifier with its 150 classes, not the
    UPerNet segmentor: export.py refuses it before building anything, in one line that says what
    the tool exports and which config to give instead, and writes nothing."""
    cfg = os.path.join("configs", "seg", "upernet_mg_ssaf_t_512x512_160k_ade20k.yaml")
    done = run_cli(["tools/export.py", "--cfg", cfg, "--output", str(tmp_path / "out"),
                    "--no-onnx"], prefix=())
    assert done.returncode == 1, done.stdout
    assert done.stdout.splitlines() == [
        f"export.py: error: {cfg} is a segmentation config (DATA.DATASET 'ade20k', main_seg.py): "
        "export.py exports the classification network (main.py's MG-SSAF classifier) only, not "
        "the UPerNet segmentor; to export the backbone, give its classification config "
        "(configs/MG-SSAF/, the file an ADE20K config's BASE names) with an ImageNet checkpoint"]
    assert not (tmp_path / "out").exists()
