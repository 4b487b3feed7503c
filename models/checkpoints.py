"""Reading and writing network weights in every format the project meets.

Accepted on reading:
- the project's own files (``save_network``): ``{"arch", "num_classes", "state_dict"}``;
- Lightning checkpoints of ``lightning_modules.classifier.Classifier`` (keys ``model.*``);
- a plain state dict (``torch.save(model.state_dict())``), e.g. torchvision AlexNet's;
- the paper authors' VGG-19 checkpoints: a dict whose ``"net"`` holds the state dict;
- any of these with DataParallel's ``module.`` prefix.
Compressed networks have smaller layers than ``build_model`` makes; ``load_network``
resizes every Linear/Conv2d/BatchNorm2d to the shapes in the state dict, so a
compressed network loads and runs without the original.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from models.pruned import IndexedLinear, resized_conv
from models.registry import ARCHS, build_model
from models.surgery import replace_module

FORMAT = "narrow-network/1"


class CheckpointMismatchError(ValueError):
    """A state dict does not fit a network; the message lists the differing keys."""


def read_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Return ``(state_dict, info)``; ``info`` holds ``arch``/``num_classes`` (from the file, else
    inferred from the keys) and, for a Lightning checkpoint, the module's hyper-parameters as
    ``info["hparams"]`` (optimizer, lr, weight_decay, ... of the training run)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    obj = torch.load(path, map_location="cpu", weights_only=False)
    return unpack_checkpoint(obj)


def unpack_checkpoint(obj: Any) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The state dict and what is known of the network in any accepted format (see module doc)."""
    info: dict[str, Any] = {}
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        info = {"arch": obj["arch"], "num_classes": obj["num_classes"], **obj.get("extra", {})}
        state = obj["state_dict"]
    elif isinstance(obj, dict) and "state_dict" in obj and "pytorch-lightning_version" in obj:
        hparams = obj.get("hyper_parameters", {})
        info = {k: hparams[k] for k in ("arch", "num_classes") if k in hparams}
        if hparams:  # LightningCLI's private entries (``_instantiator``, ...) are left out
            info["hparams"] = {k: v for k, v in dict(hparams).items() if not str(k).startswith("_")}
        state = {k[len("model."):]: v for k, v in obj["state_dict"].items() if k.startswith("model.")}
        if not state:
            raise CheckpointMismatchError(
                "this Lightning checkpoint holds no 'model.*' weights: it is not a classifier checkpoint "
                f"(its keys start with {sorted({k.split('.')[0] for k in obj['state_dict']})})"
            )
    elif isinstance(obj, dict) and "net" in obj and isinstance(obj["net"], dict):
        state = obj["net"]
    elif isinstance(obj, dict) and all(isinstance(v, Tensor) for v in obj.values()):
        state = obj
    elif isinstance(obj, nn.Module):
        state = obj.state_dict()
    else:
        raise CheckpointMismatchError(
            "unrecognised checkpoint: expected a state dict, a Lightning checkpoint, the project's "
            "network file, or a dict whose 'net' holds a state dict"
        )
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    info.setdefault("arch", infer_arch(state))
    info.setdefault("num_classes", infer_num_classes(state))
    return state, info


def infer_arch(state: dict[str, Tensor]) -> str:
    """``alexnet`` (torchvision names) or ``vgg19`` (the authors' names), from the keys."""
    if "features.0.weight" in state:
        return "alexnet"
    if "conv1.weight" in state and "batch_norm1.weight" in state:
        return "vgg19"
    raise CheckpointMismatchError(
        f"cannot tell the architecture from the keys (first ones: {list(state)[:5]}); "
        f"known architectures: {', '.join(ARCHS)} (torchvision AlexNet keys 'features.0.weight', ...; "
        "VGG-19 keys 'conv1.weight', 'batch_norm1.weight', ...)"
    )


def infer_num_classes(state: dict[str, Tensor]) -> int:
    linear_weights = [k for k, v in state.items() if k.endswith(".weight") and v.ndim == 2]
    if not linear_weights:
        raise CheckpointMismatchError("the state dict has no Linear layer to read the number of classes from")
    return int(state[linear_weights[-1]].shape[0])


def load_network(path: str | Path, arch: str | None = None, num_classes: int | None = None) -> nn.Module:
    """A network with the weights of ``path`` (any accepted format), in eval mode.

    ``arch``/``num_classes`` override what the file says; layers are resized to the
    checkpoint's shapes (compressed networks), then loaded strictly.
    """
    state, info = read_checkpoint(path)
    return network_from_state(state, arch or info["arch"], num_classes or info["num_classes"], source=str(path))


def network_from_state(state: dict[str, Tensor], arch: str, num_classes: int, source: str = "checkpoint") -> nn.Module:
    """``build_model(arch, num_classes)`` resized to and loaded with ``state``, in eval mode."""
    model = build_model(arch, num_classes)
    resize_to_state_dict(model, state)
    load_state_dict_strict(model, state, source=source)
    return model.eval()


def save_network(model: nn.Module, path: str | Path, arch: str, num_classes: int, **extra: Any) -> Path:
    """Save weights with what ``load_network`` needs to rebuild the (possibly compressed) network."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {"format": FORMAT, "arch": arch, "num_classes": num_classes, "state_dict": model.state_dict(), "extra": extra},
        path,
    )
    return path


def load_state_dict_strict(model: nn.Module, state: dict[str, Tensor], source: str = "checkpoint") -> None:
    """``model.load_state_dict(state)``, failing with the missing, unexpected and mis-shaped keys named."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    misshaped = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if own[k].shape != state[k].shape
    )
    if missing or unexpected or misshaped:
        lines = [f"{source} does not fit the {type(model).__name__} network:"]
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", misshaped)):
            if keys:
                shown = ", ".join(keys[:12]) + (f", ... ({len(keys) - 12} more)" if len(keys) > 12 else "")
                lines.append(f"  {label} ({len(keys)}): {shown}")
        lines.append("  check the architecture (arch) and the number of classes, or the file itself")
        raise CheckpointMismatchError("\n".join(lines))
    model.load_state_dict(state)


def resize_to_state_dict(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Replace Linear/Conv2d/BatchNorm2d layers whose checkpoint shapes are smaller
    (compressed networks) by fresh layers of those shapes; ``IndexedLinear`` where the
    checkpoint has an ``index`` buffer. Layers the checkpoint lacks are left alone."""
    for name, module in list(model.named_modules()):
        weight = state.get(f"{name}.weight")
        if weight is None:
            continue
        if isinstance(module, nn.Linear) and (f"{name}.index" in state or weight.shape != module.weight.shape):
            bias = f"{name}.bias" in state
            if f"{name}.index" in state:
                new: nn.Module = IndexedLinear(
                    state[f"{name}.index"], int(state[f"{name}.source_features"]), weight.shape[0], bias=bias
                )
            else:
                new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias)
            replace_module(model, name, new)
        elif isinstance(module, nn.Conv2d) and weight.shape != module.weight.shape:
            replace_module(model, name, resized_conv(module, weight.shape[0], weight.shape[1]))
        elif isinstance(module, nn.BatchNorm2d) and weight.shape != module.weight.shape:
            replace_module(model, name, nn.BatchNorm2d(weight.shape[0], eps=module.eps, momentum=module.momentum))

