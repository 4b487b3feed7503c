"""Size and speed of a network: parameters, multiply-adds, layer widths, latency."""
from __future__ import annotations

import time
from typing import Optional, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def linear_widths(model: nn.Module) -> dict[str, int]:
    """Inputs read by every Linear layer (the width of the layer of neurons before it)."""
    return {name: m.in_features for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def layer_widths(model: nn.Module) -> dict[str, int]:
    """Input width of every Linear (``in_features``) and Conv2d (``in_channels``) layer, in
    module order: the width of the layer of neurons (channels) before each."""
    return {
        name: m.in_features if isinstance(m, nn.Linear) else m.in_channels
        for name, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv2d))
    }


# Attention's two matrix products (q k^T and the weights times v) in the CPU kernel of
# scaled_dot_product_attention, which PyTorch's counter knows only for its GPU kernels.
def _attention_flops(query_shape: Sequence[int], key_shape: Sequence[int], value_shape: Sequence[int], *args: object,
                     out_shape: object = None, **kwargs: object) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


_ATTENTION = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _attention_flops}


@torch.no_grad()
def _flop_counter(model: nn.Module, input_shape: Sequence[int]) -> FlopCounterMode:
    """PyTorch's ``FlopCounterMode`` after one eval-mode forward pass of one sample of shape
    ``input_shape`` (convolutions and matrix products, attention's included; the rest is
    negligible; 2 FLOPs per multiply-add). The model's mode is restored."""
    device = next(model.parameters()).device
    was_training = model.training
    try:
        with FlopCounterMode(display=False, custom_mapping=_ATTENTION) as counter:
            model.eval()(torch.zeros(1, *input_shape, device=device))
    finally:
        model.train(was_training)
    return counter


def count_macs(model: nn.Module, input_shape: Sequence[int], within: Optional[str] = None) -> int:
    """Multiply-adds of one forward pass of one sample of shape ``input_shape`` (C, H, W): of the
    whole network, or of the submodule at path ``within`` only (a transformer's ``encoder``)."""
    counter = _flop_counter(model, input_shape)
    if within is None:
        return counter.get_total_flops() // 2
    model.get_submodule(within)  # an unknown path is an AttributeError naming it
    return sum(counter.get_flop_counts().get(f"{type(model).__name__}.{within}", {}).values()) // 2


def module_macs(model: nn.Module, input_shape: Sequence[int]) -> dict[str, int]:
    """Multiply-adds of one sample of shape ``input_shape`` (C, H, W) in every module that does
    them itself (convolutions and Linear layers, by module path): what a channel of each costs."""
    counts = _flop_counter(model, input_shape).get_flop_counts()
    root = type(model).__name__ + "."
    leaves = {name for name, m in model.named_modules() if not any(True for _ in m.children())}
    return {name[len(root):]: sum(c.values()) // 2 for name, c in counts.items()
            if name.startswith(root) and name[len(root):] in leaves}


@torch.no_grad()
def latency_ms(model: nn.Module, input_shape: Sequence[int], batch_size: int = 1, repeats: int = 30) -> float:
    """Median wall-clock time (ms) of a forward pass of ``batch_size`` samples, after warm-up."""
    device = next(model.parameters()).device
    x = torch.rand(batch_size, *input_shape, device=device)
    model = model.eval()
    times = []
    for i in range(repeats + 3):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        model(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= 3:
            times.append(time.perf_counter() - start)
    return 1000.0 * sorted(times)[len(times) // 2]


def latencies_in_turns(networks: dict[str, nn.Module], input_shape: Sequence[int],
                       batch_sizes: Sequence[int] = (1,), rounds: int = 7) -> dict[str, dict[int, float]]:
    """CPU (or GPU) latency in ms of several networks at each batch size, measured in turns: each
    round times every network once (``latency_ms``), so that load on the machine affects all
    alike; the median over ``rounds``. Returns {name: {batch size: ms}}."""
    times: dict[str, dict[int, list[float]]] = {name: {b: [] for b in batch_sizes} for name in networks}
    for _ in range(rounds):
        for name, network in networks.items():
            for b in batch_sizes:
                times[name][b].append(latency_ms(network, input_shape, batch_size=b))
    return {name: {b: sorted(t)[len(t) // 2] for b, t in per.items()} for name, per in times.items()}
