"""Export a config's network (with a checkpoint's weights) to ONNX and to safetensors.

    python tools/export.py --cfg configs/MG-SSAF/MG-SSAF-T.yaml --checkpoint mg_ssaf_t.pth \\
        --output export/

writes into ``--output``, named after MODEL.NAME:

* ``<name>.onnx``: the classifier, ``images`` ``(batch, C, H, W)`` -> ``logits``, exported at
  DATA.IMG_SIZE by torch's dynamo exporter (``torch.onnx.export(dynamo=True)``) with a dynamic
  batch; with onnxruntime installed, the tool runs it at batch 1 and 3 and prints the largest
  difference from the PyTorch logits (``--no-onnx`` skips the ONNX file);
* ``<name>.onnx.data``: the ONNX file's weights (ONNX external data, which the ``.onnx`` file
  names; keep the two files together in one folder);
* ``<name>.safetensors``: the weights, with the config as JSON in the file's metadata
  (``"config"``);
* ``<name>.json``: the same config as JSON.

Segmentation configs (``configs/seg/``, main_seg.py's UPerNet) are refused: the tool exports
the classification network only; a backbone is exported through its classification config
(``configs/MG-SSAF/``, the file an ADE20K config's ``BASE`` names) with an ImageNet checkpoint.

Loading them back: ``load_exported_config(json_path)`` gives the config for ``build_model``,
and timm reads the safetensors file itself:
``timm.create_model("mg_ssaf_t", pretrained=True, pretrained_cfg_overlay=dict(file=path))``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Iterator

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from config import load_config  # noqa: E402
from data.build import require_classification_config  # noqa: E402
from models import build_model  # noqa: E402
from models.checkpoint_io import CheckpointError, load_model_weights  # noqa: E402


def config_json(config: Any) -> str:
    """The config (a yacs CfgNode) as JSON text."""
    return json.dumps(config, indent=1, sort_keys=True)


def _dotted(node: dict, prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in node.items():
        if isinstance(value, dict):
            yield from _dotted(value, f"{prefix}{key}.")
        else:
            yield prefix + key, value


def load_exported_config(path: str) -> Any:
    """The config of an exported ``<name>.json`` (or of a ``<name>.safetensors``'s metadata),
    read through ``load_config`` (every key checked against the defaults)."""
    if path.endswith(".safetensors"):
        from safetensors import safe_open
        with safe_open(path, "pt") as f:
            values = json.loads(f.metadata()["config"])
    else:
        with open(path, encoding="utf-8") as f:
            values = json.load(f)
    return load_config(None, flags=dict(_dotted(values)))


def export_onnx(model: nn.Module, example: torch.Tensor, path: str) -> None:
    """``model`` as ONNX through the dynamo exporter, the batch dimension dynamic; the weights go
    to ``path + ".data"`` (ONNX external data), which ``path`` names."""
    torch.onnx.export(model, (example,), path, dynamo=True, external_data=True,
                      input_names=["images"], output_names=["logits"],
                      dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=4096)}},
                      verbose=False)


def check_onnx(model: nn.Module, path: str, shape: tuple[int, ...],
               batches: tuple[int, ...] = (1, 3)) -> dict[int, float]:
    """Largest |onnxruntime - PyTorch| logit difference at each batch size (onnxruntime on
    CPU)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    diffs = {}
    for batch in batches:
        x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            expected = model(x)
        (got,) = session.run(None, {"images": x.numpy()})
        diffs[batch] = (torch.from_numpy(got) - expected).abs().max().item()
    return diffs


def save_safetensors(model: nn.Module, config: Any, path: str) -> None:
    from safetensors.torch import save_file

    weights = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(weights, path, metadata={"format": "pt", "config": config_json(config)})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cfg", required=True, help="the classification model's config (YAML); "
                        "segmentation configs (configs/seg/) are refused")
    parser.add_argument("--checkpoint", help="weights (a training or released checkpoint); "
                        "without it the freshly initialised network is exported")
    parser.add_argument("--output", default="export",
                        help="folder for the files (created), named after MODEL.NAME: "
                        "<name>.safetensors, <name>.json, <name>.onnx and its weights "
                        "<name>.onnx.data (keep these two together)")
    parser.add_argument("--batch-size", type=int, default=2,
                        help="batch of the example input the graph is traced with (>= 2)")
    parser.add_argument("--no-onnx", action="store_true",
                        help="safetensors and JSON only (no .onnx and .onnx.data)")
    parser.add_argument("--opts", nargs="+", default=[], help="config overrides: KEY VALUE ...")
    args = parser.parse_args(argv)

    try:
        config = load_config(args.cfg, args.opts)
        require_classification_config(
            config, args.cfg, "export.py exports the classification network (main.py's MG-SSAF "
            "classifier) only, not the UPerNet segmentor; to export the backbone, give its "
            "classification config (configs/MG-SSAF/, the file an ADE20K config's BASE names) "
            "with an ImageNet checkpoint")
        model = build_model(config).eval()
        if args.checkpoint:
            load_model_weights(model, args.checkpoint)
    except (CheckpointError, ValueError, RuntimeError) as e:  # ConfigError is a ValueError
        parser.exit(1, f"export.py: error: {(str(e).splitlines() or [''])[0]}\n")
    os.makedirs(args.output, exist_ok=True)
    stem = os.path.join(args.output, config.MODEL.NAME)
    save_safetensors(model, config, stem + ".safetensors")
    with open(stem + ".json", "w", encoding="utf-8") as f:
        f.write(config_json(config) + "\n")
    print(f"wrote {stem}.safetensors and {stem}.json")
    if args.no_onnx:
        return
    shape = (config.MODEL.MGSSAF.IN_CHANS, config.DATA.IMG_SIZE, config.DATA.IMG_SIZE)
    example = torch.randn(max(args.batch_size, 2), *shape)  # batch 1 would be specialised
    export_onnx(model, example, stem + ".onnx")
    print(f"wrote {stem}.onnx (input 'images' (batch, {', '.join(map(str, shape))}), "
          f"dynamic batch) and its weights {stem}.onnx.data (keep the two files together)")
    try:
        diffs = check_onnx(model, stem + ".onnx", shape)
    except ImportError:
        print("onnxruntime is not installed: the ONNX file was not run")
        return
    for batch, diff in diffs.items():
        print(f"onnxruntime, batch {batch}: max |logit difference| from PyTorch {diff:.3g}")


if __name__ == "__main__":
    main()
