"""Load a network compressed by narrow with torch and torchvision alone (narrow not installed).

narrow saves a compressed network as ``compressed.pt``: a dict with ``format``, ``arch`` (a
torchvision model name such as ``resnet18`` or ``mobilenet_v2``), ``num_classes``,
``small_input``, ``state_dict`` and ``extra`` (the compression report). The network is the
torchvision one with some layers narrower, so rebuilding it takes four steps:

1. ``torchvision.models.get_model(arch, num_classes=...)``;
2. when ``small_input`` is set, the 32x32 stem the network was trained with (ResNets: a 3x3
   stride-1 first convolution and no max-pool; MobileNets and EfficientNets: a stride-1 first
   convolution);
3. every Linear, Conv2d and BatchNorm2d whose shape differs from the state dict replaced by a
   fresh one of the saved shape (a depthwise convolution stays depthwise);
4. ``load_state_dict`` with ``strict=True``, so that any key or shape that does not fit fails loudly.

Not covered: a network where the first Linear layer after the convolutions kept only some
positions of a conv channel (AlexNet's compressed ``first``, ``classifier.1``). narrow turns that
layer into its own ``IndexedLinear`` (an ``index_select`` before a Linear, with an ``index`` buffer
in the state dict), which plain torch does not have: load such a network with narrow
(``models.checkpoints.load_network``), or ship the ONNX file narrow exports
(``models.export.export_onnx``), which runs in ONNX Runtime with no Python dependency at all.
The same goes for narrow's own architectures (``vgg19``, ``resnet20`` ... ``resnet110``).

Run: ``python docs/load_without_narrow.py runs/.../compressed.pt`` prints the network's layer
widths and the logits of a random batch.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torchvision
from torch import nn


def small_input_stem(model: nn.Module, arch: str) -> None:
    """Give ``model`` (torchvision's ``arch``) the 32x32 stem it was trained with, in place."""
    if arch.startswith(("resnet", "resnext", "wide_resnet")):
        old = model.conv1
        model.conv1 = nn.Conv2d(old.in_channels, old.out_channels, 3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif arch.startswith(("mobilenet_v2", "mobilenet_v3", "efficientnet")):
        model.features[0][0].stride = (1, 1)
    else:
        raise ValueError(f"this snippet knows the small-input stem of ResNets, MobileNets and EfficientNets, "
                         f"not of {arch!r}")


def resized(module: nn.Module, state: dict[str, torch.Tensor], name: str) -> nn.Module | None:
    """A fresh layer like ``module`` with the shapes the state dict has for ``name``, or None
    when the shapes already agree (or the layer is not one that compression narrows)."""
    weight = state.get(f"{name}.weight")
    bias = f"{name}.bias" in state
    if isinstance(module, nn.Linear) and weight is not None:
        if f"{name}.index" in state:
            raise ValueError(f"{name!r} is narrow's IndexedLinear: load this network with narrow, or use its "
                             "ONNX export (see this file's docstring)")
        if weight.shape != module.weight.shape:
            return nn.Linear(weight.shape[1], weight.shape[0], bias=bias)
    elif isinstance(module, nn.Conv2d) and weight is not None and weight.shape != module.weight.shape:
        out_channels = weight.shape[0]
        # A depthwise convolution (one filter per channel) keeps groups = in = out channels.
        depthwise = module.groups > 1 and module.groups == module.in_channels == module.out_channels
        groups = out_channels if depthwise else module.groups
        in_channels = out_channels if depthwise else weight.shape[1] * module.groups
        return nn.Conv2d(in_channels, out_channels, module.kernel_size, stride=module.stride,
                         padding=module.padding, dilation=module.dilation, groups=groups, bias=bias,
                         padding_mode=module.padding_mode)
    elif isinstance(module, nn.BatchNorm2d):
        mean = state.get(f"{name}.running_mean")
        if mean is not None and mean.shape[0] != module.num_features:
            return nn.BatchNorm2d(mean.shape[0], eps=module.eps, momentum=module.momentum)
    return None


def load_compressed(path: str | Path) -> nn.Module:
    """The network saved by narrow in ``path`` (``compressed.pt``), in eval mode: it takes images
    (B, 3, H, W) and returns logits (B, num_classes)."""
    # weights_only=False: besides tensors, the file holds the compression report (``extra``), whose
    # plain Python values torch's weights-only unpickler may refuse. Unpickling can run code: load
    # only files you trust, such as your own compression runs.
    saved = torch.load(path, map_location="cpu", weights_only=False)
    arch, state = saved["arch"], saved["state_dict"]
    if not isinstance(arch, str) or arch not in torchvision.models.list_models(module=torchvision.models) \
            or arch == "vgg19":  # narrow's "vgg19" is the paper's CIFAR VGG, not torchvision's
        raise ValueError(f"{arch!r} is not a torchvision network: load it with narrow, or use its ONNX export")
    model = torchvision.models.get_model(arch, weights=None, num_classes=int(saved["num_classes"]))
    if saved.get("small_input", False):
        small_input_stem(model, arch)
    for name, module in list(model.named_modules()):
        new = resized(module, state, name)
        if new is not None:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, new)
    model.load_state_dict(state, strict=True)
    return model.eval()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: python {sys.argv[0]} path/to/compressed.pt")
    network = load_compressed(sys.argv[1])
    widths = {n: (m.out_channels if isinstance(m, nn.Conv2d) else m.out_features)
              for n, m in network.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    print(f"{sum(p.numel() for p in network.parameters()):,} parameters; output widths: {widths}")
    with torch.no_grad():  # 64x64 suits both stems: the networks end in adaptive average pooling
        print("logits of 2 random 64x64 images:", network(torch.rand(2, 3, 64, 64)))
