"""Export a trained detector or segmentor to TorchScript or ONNX, and check what was exported.

The exported model takes **one image of a fixed size** (the size it was exported at): a float
Tensor[3, H, W] with values in [0, 1], RGB, as ``segkit.Predictor`` takes it. Normalisation, the
model's own resizing and all post-processing (NMS, mask pasting, sliding windows) are inside the
graph. Outputs:

- detectors: ``boxes`` (float32 [D, 4], xyxy pixels of the input), ``labels`` (int64 [D], 1..K),
  ``scores`` (float32 [D]) and, with a mask head, ``masks`` (float32 [D, 1, H, W] probabilities);
  ``D`` varies from image to image;
- segmentors: ``sem_seg`` (float32 [K, H, W] class scores).

Both formats are produced by tracing the model on an example image; every branch that depends on
the data is written so that the trace records it as tensor operations. :func:`check_export` runs
the exported model and the PyTorch model on sample images and compares every output (the
``segkit export`` command does so after writing the file and refuses a mismatch). ONNX needs the
``onnx`` package (and ``onnxruntime`` for the check): ``pip install 'segkit-cv[export]'``.

A JSON description (format, input size, output names, class names) is stored in the file: the
TorchScript archive's extra file ``segkit.json``, the ONNX model's ``segkit`` metadata entry.

Example:
    >>> model = segkit.load_model("work_dirs/quickstart_mask/checkpoints/best.ckpt")
    >>> image = torch.rand(3, 128, 128)
    >>> export_model(model, "model.pt", "torchscript", image)
    >>> check_export("model.pt", model, [image])["max_abs_diff"]
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from segkit.errors import UserError
from segkit.fileio import atomic_open
from segkit.models.base import describe

__all__ = ["FORMATS", "export_model", "check_export", "load_exported", "output_names", "ExportMismatch"]

FORMATS = ("torchscript", "onnx")
_OPSET = 17
_META_FILE = "segkit.json"


class ExportMismatch(UserError):
    """The exported model's outputs differ from the PyTorch model's beyond the tolerance."""


def output_names(model: nn.Module) -> tuple[str, ...]:
    """Names of the exported model's outputs, in order: the output keys the model declares."""
    return describe(model).output_keys


class _OneImage(nn.Module):
    """The model as a function of one image Tensor[3, H, W] of the export size, returning a tuple."""

    def __init__(self, model: nn.Module, size: tuple[int, int]) -> None:
        super().__init__()
        self.model = model
        self.size = size
        self.names = output_names(model)

    def forward(self, image: Tensor) -> tuple[Tensor, ...]:
        # expand() refuses another size at run time (the graph holds the export size's constants)
        image = image.expand(3, self.size[0], self.size[1])
        output = self.model([image])[0]
        return tuple(output[name] for name in self.names)


def _description(model: nn.Module, fmt: str, size: tuple[int, int], class_names: Sequence[str] | None) -> dict:
    info = describe(model).as_dict()
    return {
        "format": fmt,
        "input": {"name": "image", "shape": [3, size[0], size[1]], "dtype": "float32",
                  "values": "RGB in [0, 1]"},
        **info,
        "class_names": list(class_names) if class_names is not None else None,
    }


@contextlib.contextmanager
def _quiet_jit() -> Iterator[None]:
    """Silence torch.jit's deprecation notes (TorchScript is still what ``torch.jit.load`` users need) and
    the tracer's notes on Python values it records as constants (check_export tests the ones that matter
    on other images)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r"`torch\.jit\.")
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        yield


def _trace(model: nn.Module, example: Tensor) -> torch.jit.ScriptModule:
    wrapper = _OneImage(model, (int(example.shape[-2]), int(example.shape[-1]))).eval()
    with _quiet_jit(), torch.no_grad():
        return torch.jit.trace(wrapper, (example,), check_trace=False, strict=False)


def export_model(model: nn.Module, out: str | os.PathLike[str], fmt: str, example: Tensor, *,
                 class_names: Sequence[str] | None = None) -> dict:
    """Trace ``model`` on ``example`` and write it to ``out`` in format ``fmt`` (atomically).

    Args:
        model: a segkit detector or segmentor (any device; it is exported on the CPU in eval mode).
        out: the file to write.
        fmt: ``"torchscript"`` or ``"onnx"``.
        example: float Tensor[3, H, W] in [0, 1]; fixes the input size of the exported model. For a
            detector, pick an image on which it detects something (so every branch is recorded).
        class_names: stored in the file's description.

    Returns:
        The description stored in the file.

    Raises:
        UserError: an unknown format, a malformed example, or ``onnx`` missing for ONNX.
        FileWriteError: ``out`` cannot be written (a folder, a full or read-only disk); a previous
            file at ``out`` is left as it was.
    """
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}.")
    if not isinstance(example, Tensor) or example.dim() != 3 or example.shape[0] != 3:
        raise UserError(f"the example image must be a float Tensor[3, H, W], got "
                        f"{tuple(example.shape) if isinstance(example, Tensor) else type(example).__name__}.")
    model = model.cpu().eval()
    example = example.detach().float().cpu()
    size = (int(example.shape[-2]), int(example.shape[-1]))
    description = _description(model, fmt, size, class_names)
    traced = _trace(model, example)
    # Written through a file object: torch.jit.save given a path aborts the process on a full disk.
    with atomic_open(os.fspath(out), "wb", what="the exported model") as f:
        if fmt == "torchscript":
            with _quiet_jit():
                torch.jit.save(traced, f, _extra_files={_META_FILE: json.dumps(description)})
        else:
            f.write(_onnx_bytes(traced, example, description))
    return description


def _import_onnx(purpose: str) -> Any:
    try:
        import onnx
    except ImportError as exc:
        raise UserError(f"{purpose} needs the 'onnx' package: pip install 'segkit-cv[export]' "
                        f"(or pip install onnx onnxruntime).") from exc
    return onnx


def _onnx_bytes(traced: torch.jit.ScriptModule, example: Tensor, description: dict) -> bytes:
    """The ONNX model of ``traced`` with ``description`` in its metadata, serialised in memory (the caller
    writes it, so that a failed write is reported as such)."""
    onnx = _import_onnx("ONNX export")
    names = description["outputs"]
    dynamic = {name: {0: "detections"} for name in names if name != "sem_seg"}
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter's deprecation and tracer notes
        torch.onnx.export(traced, (example,), buffer, dynamo=False, opset_version=_OPSET, input_names=["image"],
                          output_names=names, dynamic_axes=dynamic or None, do_constant_folding=True)
    proto = onnx.load_from_string(buffer.getvalue())
    entry = proto.metadata_props.add()
    entry.key, entry.value = "segkit", json.dumps(description)
    return proto.SerializeToString()


class _OnnxRunner:
    def __init__(self, path: str) -> None:
        try:
            import onnxruntime
        except ImportError as exc:
            raise UserError("running an ONNX model needs 'onnxruntime': pip install 'segkit-cv[export]' "
                            "(or pip install onnxruntime).") from exc
        self.session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        self.names = [o.name for o in self.session.get_outputs()]

    def __call__(self, image: Tensor) -> tuple[Tensor, ...]:
        outputs = self.session.run(self.names, {"image": image.detach().float().cpu().numpy()})
        return tuple(torch.from_numpy(o) for o in outputs)


def load_exported(path: str | os.PathLike[str]) -> tuple[Any, dict]:
    """Load a file written by :func:`export_model`: ``(callable, description)``.

    The callable takes one float Tensor[3, H, W] and returns the tuple of outputs named in
    ``description["outputs"]``.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"exported model {path} does not exist.")
    if path.endswith(".onnx"):
        onnx = _import_onnx("reading an ONNX model")
        proto = onnx.load(path, load_external_data=False)
        meta = {p.key: p.value for p in proto.metadata_props}
        return _OnnxRunner(path), json.loads(meta.get("segkit", "{}"))
    extra = {_META_FILE: ""}
    try:
        with _quiet_jit():
            module = torch.jit.load(path, map_location="cpu", _extra_files=extra)
    except RuntimeError as exc:
        raise UserError(f"{path} is not a TorchScript archive written by segkit export ({exc}).") from exc
    return module, json.loads(extra[_META_FILE] or "{}")


def check_export(path: str | os.PathLike[str], model: nn.Module, images: Sequence[Tensor], *,
                 atol: float = 1e-4) -> dict:
    """Compare the exported model at ``path`` with ``model`` on ``images`` (each Tensor[3, H, W]).

    Detections must match in number and labels, and every box, score, mask probability or class
    score must agree within ``atol``.

    Returns:
        ``{"images": n, "max_abs_diff": d, "detections": total or None}``.

    Raises:
        ExportMismatch: an output differs (names the image and the output).
    """
    exported, description = load_exported(path)
    model = model.cpu().eval()
    names = output_names(model)
    worst, detections = 0.0, 0 if "boxes" in names else None
    for index, image in enumerate(images):
        image = image.detach().float().cpu()
        with torch.no_grad():
            reference = model([image])[0]
            got = exported(image)
        if len(got) != len(names):
            raise ExportMismatch(f"the exported model returns {len(got)} outputs, the model {len(names)} ({names}).")
        for name, value in zip(names, got):
            expected = reference[name]
            if tuple(value.shape) != tuple(expected.shape):
                raise ExportMismatch(
                    f"image {index}: exported output '{name}' has shape {tuple(value.shape)}, the PyTorch model's "
                    f"{tuple(expected.shape)}; the exported graph does not follow this image's data.")
            if expected.dtype in (torch.int64, torch.int32, torch.bool):
                if not torch.equal(value.to(expected.dtype), expected):
                    raise ExportMismatch(f"image {index}: exported output '{name}' differs from the PyTorch model's.")
                continue
            diff = float((value.float() - expected.float()).abs().max()) if expected.numel() else 0.0
            if diff > atol:
                raise ExportMismatch(f"image {index}: exported output '{name}' differs from the PyTorch model's by "
                                     f"{diff:.2e} (tolerance {atol:.0e}).")
            worst = max(worst, diff)
        if detections is not None:
            detections += int(reference["boxes"].shape[0])
    return {"images": len(images), "max_abs_diff": worst, "detections": detections, "format": description.get("format")}
