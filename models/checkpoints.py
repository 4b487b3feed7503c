"""Reading and writing network weights in every format the project meets.

Accepted on reading:
- the project's own files (``save_network``): ``{"arch", "num_classes", "small_input", "state_dict"}``
  (``arch`` a name or a ``{class_path, init_args}`` mapping, ``models.registry``);
- Lightning checkpoints of ``lightning_modules.classifier.Classifier`` (keys ``model.*``);
- a plain state dict (``torch.save(model.state_dict())``), e.g. torchvision AlexNet's;
- the paper authors' VGG-19 checkpoints: a dict whose ``"net"`` holds the state dict;
- any of these with DataParallel's ``module.`` prefix.
Compressed networks have smaller layers than ``build_model`` makes; ``load_network``
resizes every Linear/Conv2d/BatchNorm2d (and an attention's number of heads) to the shapes
in the state dict, so a compressed network loads and runs without the original. Every
``nn.MultiheadAttention`` is loaded as the equal ``models.attention.HeadAttention``, and every
attention of the qkv/proj layout (timm's) as the equal ``SelfAttention``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

from models.attention import HeadAttention, separate_attention
from models.pruned import IndexedLinear, is_depthwise, resized_conv
from models.registry import SHORT_NAMES, Arch, NetworkSpec
from models.surgery import replace_module

FORMAT = "narrow-network/1"


class CheckpointMismatchError(ValueError):
    """A state dict does not fit a network; the message lists the differing keys."""


def read_checkpoint(path: str | Path, arch: Optional[Arch] = None) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Return ``(state_dict, info)``; ``info`` holds ``arch``/``num_classes``/``small_input``
    (from the file, else inferred from the keys; ``arch`` given here is not inferred) and, for
    a Lightning checkpoint, the module's hyper-parameters as ``info["hparams"]`` (optimizer, lr,
    weight_decay, ... of the training run), with its DataModule's ``batch_size`` among them."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    obj = torch.load(path, map_location="cpu", weights_only=False)
    return unpack_checkpoint(obj, arch)


def unpack_checkpoint(obj: Any, arch: Optional[Arch] = None) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The state dict and what is known of the network in any accepted format (see module doc)."""
    info: dict[str, Any] = {}
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        info = {k: obj[k] for k in ("arch", "num_classes", "small_input") if k in obj}
        info.update(obj.get("extra", {}))
        state = obj["state_dict"]
    elif isinstance(obj, dict) and "state_dict" in obj and "pytorch-lightning_version" in obj:
        hparams = obj.get("hyper_parameters", {})
        info = {k: hparams[k] for k in ("arch", "num_classes", "small_input") if k in hparams}
        if hparams:  # LightningCLI's private entries (``_instantiator``, ...) are left out
            info["hparams"] = {k: v for k, v in dict(hparams).items() if not str(k).startswith("_")}
        data = obj.get("datamodule_hyper_parameters") or {}
        if "batch_size" in data:  # what fine-tuning trains at (compression.finetune)
            info.setdefault("hparams", {})["batch_size"] = data["batch_size"]
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
    if arch is not None:
        info["arch"] = arch
    if "arch" not in info:
        info["arch"] = infer_arch(state)
    info.setdefault("num_classes", infer_num_classes(state))
    return state, info


def infer_arch(state: dict[str, Tensor]) -> Arch:
    """The network from a plain state dict's keys: ``alexnet`` (torchvision names), ``vgg19``
    (the authors' names) or a CIFAR ResNet (``resnet20`` ... ``resnet110``: a 16-channel 3x3
    ``conv1`` and three ``layer<i>`` stages of BasicBlocks). Any other network says which
    network it is in the file (``save_network``, a Lightning checkpoint) or on the command line."""
    first = state.get("features.0.weight")
    if first is not None and first.ndim == 4 and tuple(first.shape[2:]) == (11, 11):  # AlexNet's 11x11 stem
        return "alexnet"
    if "conv1.weight" in state and "batch_norm1.weight" in state:
        return "vgg19"
    conv1 = state.get("conv1.weight")
    if conv1 is not None and tuple(conv1.shape[1:]) == (3, 3, 3) and "layer4.0.conv1.weight" not in state:
        blocks = {k.split(".")[1] for k in state if k.startswith("layer1.") and k.endswith(".conv1.weight")}
        depth = 6 * len(blocks) + 2
        if blocks and f"resnet{depth}" in SHORT_NAMES and "layer1.0.conv3.weight" not in state:
            return f"resnet{depth}"
    raise CheckpointMismatchError(
        f"cannot tell the network from the keys of a plain state dict (first ones: {list(state)[:5]}); "
        "say which it is with --arch (a short name such as resnet56, any torchvision model name such as "
        "mobilenet_v2, or {class_path: ..., init_args: ...}); recognised from the keys alone: alexnet, vgg19 "
        "and the CIFAR ResNets"
    )


def infer_num_classes(state: dict[str, Tensor]) -> int:
    linear_weights = [k for k, v in state.items() if k.endswith(".weight") and v.ndim == 2]
    if not linear_weights:
        raise CheckpointMismatchError("the state dict has no Linear layer to read the number of classes from")
    return int(state[linear_weights[-1]].shape[0])


def load_network(path: str | Path, arch: Optional[Arch] = None, num_classes: Optional[int] = None,
                 small_input: Optional[bool] = None) -> nn.Module:
    """A network with the weights of ``path`` (any accepted format), in eval mode.

    ``arch``/``num_classes``/``small_input`` override what the file says (a plain state dict
    of a network other than those ``infer_arch`` knows needs ``arch``); layers are resized to
    the checkpoint's shapes (compressed networks), then loaded strictly.
    """
    state, info = read_checkpoint(path, arch=arch)
    spec = network_spec(info, arch=arch, num_classes=num_classes, small_input=small_input)
    return network_from_state(state, spec, source=str(path))


def network_spec(info: dict[str, Any], arch: Optional[Arch] = None, num_classes: Optional[int] = None,
                 small_input: Optional[bool] = None) -> NetworkSpec:
    """The ``NetworkSpec`` of ``read_checkpoint``'s ``info``, with any of its fields overridden."""
    return NetworkSpec(arch if arch is not None else info["arch"],
                       int(num_classes if num_classes is not None else info["num_classes"]),
                       bool(small_input if small_input is not None else info.get("small_input", False)))


def check_finite(state: dict[str, Tensor], source: str = "checkpoint") -> None:
    """Refuse a state dict with a NaN or an infinity, in one line naming the first such tensor
    and entry: such a network cannot be compressed (its statistics would be NaN too), and
    saying so before any pass over the data costs nothing."""
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = ~torch.isfinite(tensor)
            where = tuple(int(i) for i in torch.nonzero(bad)[0]) if tensor.ndim else ()
            value = tensor[where] if tensor.ndim else tensor
            raise ValueError(f"{source}: {name}{list(where) if where else ''} is {float(value)} ({int(bad.sum())} "
                             f"non-finite of {tensor.numel()} values in that tensor): training diverged or the file is "
                             "damaged; use an earlier checkpoint or retrain")


def network_from_state(state: dict[str, Tensor], spec: NetworkSpec, source: str = "checkpoint") -> nn.Module:
    """``spec.build()`` resized to and loaded with ``state`` (refused with ``check_finite`` when it
    holds a NaN or an infinity), in eval mode."""
    check_finite(state, source)
    model = spec.build()
    # attention saved with separate projections (any network this project compressed) is
    # separated before loading; one saved packed (as trained) after
    separate_attention(model, only={n for n, _ in model.named_modules() if f"{n}.q_proj.weight" in state})
    resize_to_state_dict(model, state)
    load_state_dict_strict(model, state, source=source)
    separate_attention(model)
    return model.eval()


def save_network(model: nn.Module, path: str | Path, spec: NetworkSpec, **extra: Any) -> Path:
    """Save weights with what ``load_network`` needs to rebuild the (possibly compressed) network."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": FORMAT, **spec.to_dict(), "state_dict": model.state_dict(), "extra": extra}, path)
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
    """Replace the layers whose checkpoint shapes differ (compressed networks) by fresh layers
    of those shapes: Linear (``IndexedLinear`` where the checkpoint has an ``index`` buffer),
    Conv2d (a depthwise one stays depthwise), BatchNorm, PReLU. Layers the checkpoint lacks
    are left alone; an attention module gets the number of heads of its q projection."""
    for name, module in list(model.named_modules()):
        q = state.get(f"{name}.q_proj.weight")
        if isinstance(module, HeadAttention) and q is not None:
            module.num_heads = q.shape[0] // module.head_dim
    for name, module in list(model.named_modules()):
        weight = state.get(f"{name}.weight")
        if isinstance(module, nn.Linear) and weight is not None \
                and (f"{name}.index" in state or weight.shape != module.weight.shape):
            bias = f"{name}.bias" in state
            if f"{name}.index" in state:
                new: nn.Module = IndexedLinear(
                    state[f"{name}.index"], int(state[f"{name}.source_features"]), weight.shape[0], bias=bias
                )
            else:
                new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias)
            replace_module(model, name, new)
        elif isinstance(module, nn.Conv2d) and weight is not None and weight.shape != module.weight.shape:
            in_channels = weight.shape[0] if is_depthwise(module) else weight.shape[1] * module.groups
            replace_module(model, name, resized_conv(module, weight.shape[0], in_channels))
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            entries = state.get(f"{name}.weight", state.get(f"{name}.running_mean"))
            if entries is not None and entries.shape[0] != module.num_features:
                replace_module(model, name, type(module)(entries.shape[0], eps=module.eps, momentum=module.momentum,
                                                         affine=module.affine,
                                                         track_running_stats=module.track_running_stats))
        elif isinstance(module, nn.PReLU) and weight is not None and weight.shape != module.weight.shape:
            replace_module(model, name, nn.PReLU(weight.shape[0]))
