"""Shipping a (compressed) network: ONNX and TorchScript files, their checks and their speed.

A compressed network is an ordinary ``nn.Module`` (smaller Linear/Conv2d/BatchNorm layers and,
where a Linear layer reads only some positions of its conv channels, ``models.pruned.IndexedLinear``,
an ``index_select`` before a Linear). To run it without this project:
- ``export_onnx`` writes an ONNX file (input ``images`` (B, C, H, W), output ``logits``
  (B, num_classes), the batch dimension dynamic) that ONNX Runtime, TensorRT, OpenVINO, ... run
  with no Python or PyTorch at all: the dependency-free route;
- ``export_torchscript`` writes a TorchScript file for libtorch (C++) and ``torch.jit.load``.
``check_onnx``/``check_torchscript`` run a file and the network on the same images and fail
(``ExportMismatchError``) when they disagree; ``onnx_latency_ms`` times several ONNX files
(the original and compressed networks, say) against each other on the CPU.

onnx, onnxscript and onnxruntime are the ``export`` extra (``pip install -e .[export]``); they are
imported when first needed, so the rest of the project runs without them.
"""
from __future__ import annotations

import copy
import importlib
import statistics
import time
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch
from torch import Tensor, nn

INPUT_NAME = "images"
OUTPUT_NAME = "logits"
# The opset torch 2.14's ONNX exporter writes natively (its onnxscript library's): asking for it
# means no version conversion after export, and any ONNX Runtime of the last years runs it.
DEFAULT_OPSET = 18
# Exporting traces the network on a batch of this size; the batch dimension stays dynamic.
# Not 1: torch.export takes a dimension of size 0 or 1 for a constant.
_EXAMPLE_BATCH = 2


class ExportMismatchError(ValueError):
    """An exported file computes something other than the network it was exported from."""


class Difference(NamedTuple):
    """How far an exported file's outputs are from the network's: the largest absolute
    difference, and that divided by the largest absolute output of the network."""

    max_abs: float
    max_rel: float


def _require(*names: str) -> list[ModuleType]:
    """The modules ``names``, or an ImportError that says how to install them."""
    modules, missing = [], []
    for name in names:
        try:
            modules.append(importlib.import_module(name))
        except ImportError:
            missing.append(name)
    if missing:
        raise ImportError(f"exporting and checking ONNX files needs {', '.join(missing)}: "
                          "install the export extra with `pip install -e .[export]`")
    return modules


def _example(model: nn.Module, input_shape: Sequence[int], batch: int = _EXAMPLE_BATCH) -> Tensor:
    """Random images (batch, *input_shape) on the device and in the dtype of ``model``'s weights."""
    weight = next(iter(model.parameters()), None)
    return torch.rand(batch, *input_shape, device=weight.device if weight is not None else None,
                      dtype=weight.dtype if weight is not None else None)


def _inference_copy(model: nn.Module) -> nn.Module:
    """``model`` in eval mode (running BatchNorm statistics, no dropout), as it is shipped; a
    copy when it is training, so that the caller's network is left as it was."""
    return copy.deepcopy(model).eval() if model.training else model


def _static_pools(model: nn.Module, input_shape: Sequence[int]) -> nn.Module:
    """``model`` with every ``AdaptiveAvgPool2d`` that, at ``input_shape``, is an ordinary pool
    replaced by it: nothing (input and output the same size), an ``AvgPool2d`` (the input a
    multiple of the output) or a nearest ``Upsample`` (the output a multiple of the input: every
    window is one pixel). The same function at this input size, which the ONNX file fixes anyway
    (only the batch is dynamic); a copy when anything is replaced. torch's exporter writes an
    adaptive pool as a gather of its windows and a mean: AlexNet's 1x1 -> 6x6 at 64x64 took 10 to
    15 % of ONNX Runtime's time at batch 64 for the README's compressed AlexNets."""
    pools = {name: m for name, m in model.named_modules() if isinstance(m, nn.AdaptiveAvgPool2d)}
    if not pools:
        return model
    sizes: dict[str, tuple[torch.Size, torch.Size]] = {}
    hooks = [m.register_forward_hook(lambda m, i, o, name=name: sizes.__setitem__(name, (i[0].shape[-2:], o.shape[-2:])))
             for name, m in pools.items()]
    try:
        with torch.no_grad():
            model(_example(model, input_shape))
    finally:
        for hook in hooks:
            hook.remove()
    replaced = {}
    for name, ((h, w), (H, W)) in sizes.items():
        if (h, w) == (H, W):
            replaced[name] = nn.Identity()
        elif h % H == 0 and w % W == 0:
            replaced[name] = nn.AvgPool2d((h // H, w // W))
        elif H % h == 0 and W % w == 0:
            replaced[name] = nn.Upsample(scale_factor=(H // h, W // w), mode="nearest")
    if not replaced:
        return model
    model = copy.deepcopy(model)
    for name, module in replaced.items():
        model.set_submodule(name, module)
    return model


def export_onnx(model: nn.Module, path: str | Path, input_shape: Sequence[int], opset: int = DEFAULT_OPSET) -> Path:
    """Write ``model`` (in eval mode) as an ONNX file: input ``images`` (B, *input_shape), output
    ``logits`` (B, num_classes), with B dynamic. ``input_shape`` is (C, H, W), e.g. (3, 32, 32).

    The exporter is torch.export's ("dynamo", torch's default since 2.9, which writes the graph
    with onnxscript), not the TorchScript-based one (``dynamo=False``): that one is deprecated (a
    DeprecationWarning on every call), and it cannot export AlexNet at the paper's 64x64 (its
    adaptive_avg_pool2d from 1x1 to 6x6 is "unsupported: output size that are not factor of input
    size"), where the dynamo one exports every network of the project, ``IndexedLinear``'s
    ``index_select`` (an ONNX Gather) included. Hence onnxscript in the ``export`` extra.
    """
    _require("onnx", "onnxscript")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = _static_pools(_inference_copy(model), input_shape)
    batch = torch.export.Dim("batch")
    with torch.no_grad():
        torch.onnx.export(
            model, (_example(model, input_shape),), str(path), dynamo=True, opset_version=opset,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: batch},),  # by position: the forward argument may have any name
            # One self-contained file: the project's networks are far below protobuf's 2 GB limit.
            external_data=False,
            verbose=False,  # no progress lines on stdout
        )
    return path


def export_torchscript(model: nn.Module, path: str | Path, input_shape: Sequence[int]) -> Path:
    """Write ``model`` (in eval mode) traced on a batch of (2, *input_shape) as a TorchScript file
    (``torch.jit.load`` in Python, ``torch::jit::load`` in libtorch); it runs on any batch size.

    torch 2.14 marks ``torch.jit`` deprecated (a FutureWarning on every call) in favour of
    ``torch.export``; the file is still what libtorch (C++) loads without Python, so it is written
    here with that warning silenced. ONNX (``export_onnx``) is the format meant to last.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = _inference_copy(model)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=FutureWarning)
        traced = torch.jit.trace(model, _example(model, input_shape))
        torch.jit.save(traced, str(path))
    return path


def _onnx_session(path: str | Path, spinning: bool = True) -> Any:
    """An ONNX Runtime session on the CPU with ORT's default options (intra-op threads: ORT's
    default, one per physical core; all graph optimisations), its threads spinning after a run
    unless ``spinning`` is False."""
    (ort,) = _require("onnxruntime")
    options = ort.SessionOptions()
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _compare(label: str, got: np.ndarray, reference: np.ndarray, rtol: float) -> Difference:
    if got.shape != reference.shape:
        raise ExportMismatchError(f"{label} gives outputs of shape {got.shape}, the network {reference.shape}")
    max_abs = float(np.abs(got.astype(np.float64) - reference).max(initial=0.0))
    scale = float(np.abs(reference).max(initial=0.0))
    max_rel = max_abs / scale if scale > 0 else max_abs  # an all-zero output: the absolute difference
    if not max_rel <= rtol:  # also catches NaN
        raise ExportMismatchError(f"{label} differs from the network by {max_rel:.3g} relative to its largest "
                                  f"output (max abs {max_abs:.3g}), more than rtol={rtol:g}")
    return Difference(max_abs, max_rel)


def _reference(model: nn.Module, inputs: Tensor) -> np.ndarray:
    with torch.no_grad():
        return _inference_copy(model)(inputs).detach().cpu().double().numpy()


def check_onnx(path: str | Path, model: nn.Module, inputs: Tensor, rtol: float = 1e-4) -> Difference:
    """Run the ONNX file ``path`` in ONNX Runtime (CPU) and ``model`` (eval mode) on ``inputs``
    (B, C, H, W); return their ``Difference``, or raise ``ExportMismatchError`` when its
    ``max_rel`` exceeds ``rtol``."""
    session = _onnx_session(path)
    got = session.run(None, {session.get_inputs()[0].name: inputs.detach().cpu().float().numpy()})[0]
    return _compare(f"ONNX file {str(path)!r}", got, _reference(model, inputs), rtol)


def check_torchscript(path: str | Path, model: nn.Module, inputs: Tensor, rtol: float = 1e-4) -> Difference:
    """Like ``check_onnx`` for a TorchScript file, run by ``torch.jit.load`` on ``inputs``' device."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=FutureWarning)
        loaded = torch.jit.load(str(path), map_location=inputs.device)
        got = loaded(inputs).detach().cpu().double().numpy()
    return _compare(f"TorchScript file {str(path)!r}", got, _reference(model, inputs), rtol)


def onnx_latency_ms(files: dict[str, Path], input_shape: Sequence[int], batch_sizes: Sequence[int] = (1, 64),
                    rounds: int = 7, repeats: int = 5) -> dict[str, dict[int, float]]:
    """ONNX Runtime's CPU time of one batch, in milliseconds, of each file in ``files`` (name ->
    path) for each batch size: ``{name: {batch_size: ms}}``.

    The files are timed in turns in this one process: each of ``rounds`` rounds times every file
    once (the mean of ``repeats`` runs, after a warm-up run), and the result is the median over the
    rounds, so that load from other programs on the machine slows all files alike instead of
    whichever ran at the time. One session per file, created once; intra-op threads are left at
    ONNX Runtime's default (one per physical core), as a deployment would run the file, but do not
    spin after a run: several sessions in one process would otherwise take the cores from one
    another (two files of one network, timed in turns with others, took 15.9 and 28.2 ms at batch
    1, and 10.4 and 10.2 ms without spinning). Inputs are random images (batch, *input_shape).
    """
    sessions = {name: _onnx_session(path, spinning=False) for name, path in files.items()}
    rng = np.random.default_rng(0)
    times: dict[str, dict[int, list[float]]] = {name: {b: [] for b in batch_sizes} for name in files}
    for b in batch_sizes:
        images = rng.random((b, *input_shape), dtype=np.float32)
        feeds = {name: {s.get_inputs()[0].name: images} for name, s in sessions.items()}
        for name, session in sessions.items():  # warm-up: memory arenas, lazily built kernels
            session.run(None, feeds[name])
        for _ in range(rounds):
            for name, session in sessions.items():
                start = time.perf_counter()
                for _ in range(repeats):
                    session.run(None, feeds[name])
                times[name][b].append((time.perf_counter() - start) * 1000 / repeats)
    return {name: {b: statistics.median(t) for b, t in per_batch.items()} for name, per_batch in times.items()}


EXPORTERS = {"onnx": (export_onnx, check_onnx, "onnx"), "torchscript": (export_torchscript, check_torchscript, "ts.pt")}


def export_checked_and_timed(networks: dict[str, nn.Module], folder: Path, input_shape: Sequence[int],
                             images: Tensor, formats: Sequence[str] = ("onnx",)) -> dict[str, Any]:
    """``<folder>/<name>.<ext>`` for every network (name -> module) and format, each checked
    against PyTorch on ``images`` (a difference above 1e-4 relative raises
    ``ExportMismatchError``): ``{format: {name: {file, bytes, max_abs_difference,
    max_rel_difference}}}``; with ONNX also ``onnx_latency_ms`` and ``torch_latency_ms``, batch 1
    and 64, every network timed in turns in one process."""
    from models.profile import latencies_in_turns  # models.profile imports nothing from here

    out: dict[str, Any] = {}
    for fmt in formats:
        export, check, ext = EXPORTERS[fmt]
        files = {}
        for name, network in networks.items():
            path = export(network.eval(), Path(folder) / f"{name}.{ext}", input_shape)
            difference = check(path, network, images)
            files[name] = {"file": str(path), "bytes": path.stat().st_size,
                           "max_abs_difference": difference.max_abs, "max_rel_difference": difference.max_rel}
        out[fmt] = files
    if "onnx" in formats:
        out["onnx_latency_ms"] = onnx_latency_ms({n: Path(f["file"]) for n, f in out["onnx"].items()}, input_shape)
        out["torch_latency_ms"] = latencies_in_turns(networks, input_shape, (1, 64))
    return out
