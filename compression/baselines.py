"""Baselines at equal width: other ways to keep k of a layer's K input neurons.

The lasso (``grouplasso``) chooses which neurons feeding a layer y = W x + b (W: D x K) to
keep, and how many. To judge that choice, every baseline here keeps exactly the same number
k of neurons (groups of g = ``stats.group`` consecutive columns: one neuron for g = 1, one
input channel's kh*kw patch entries for a convolution) and differs only in *which* ones and
in the weights it gives them:

- ``magnitude``: the k groups of the trained W with the largest norm ||W[:, group c]||_F,
  the others zeroed, no refit (classic magnitude pruning of the consumer's columns);
- ``magnitude_refit``: the same support, refit by least squares on the layer's statistics
  (``grouplasso.debias``: the best V with that support for the layer's MSE);
- ``activation``: the k groups with the largest output contribution
  sqrt(trace(W_c G_cc W_c^T)), then refit (see below);
- ``lasso`` / ``lasso_refit``: the certified lasso solution with k groups, as given and
  debiased.

Why the activation score is an output-sensitivity criterion. Neuron j contributes the
vector W[:, j] x_j to the layer's output; over the training data the root mean square of
that contribution is

    sqrt( (1/n) sum_i ||W[:, j] x_ij||^2 ) = ||W[:, j]|| sqrt(G_jj),     G = (1/n) sum_i x_i x_i^T,

and for a group c (columns S_c) the contribution W_c x_{i,c} has RMS sqrt(trace(W_c G_cc W_c^T)),
which reduces to the g = 1 formula. It measures how much the layer's *output* moves when the
neuron is removed alone, unlike the magnitude score, which ignores how large the neuron's
activations are (a large weight on a rarely active neuron scores high). It ignores the
correlations between neurons (the off-diagonal blocks of G): two neurons that carry the same
signal both score high although one of them is redundant. The least-squares refit accounts
for those correlations (it redistributes the removed neurons' contribution onto the kept
ones), the selection does not; the lasso accounts for them in both.

``torch_pruning_network`` is an external baseline: Torch-Pruning (``pip install -e .[bench]``)
removes the producer's output units (rows of a Linear, channels of a Conv2d, with the
BatchNorm in between) of lowest group importance. Attention heads are removed whole, as
Torch-Pruning's pruners do with ``prune_num_heads=True``: the importance of the ``head_dim``
units of a head (its rows of q, k and v and columns of the output projection, one group in
Torch-Pruning's graph) is averaged into the head's score, and the attention's ``num_heads`` is
set to the heads kept afterwards, as its examples do for timm's and Hugging Face's attention. In Torch-Pruning 1.6.0
``GroupMagnitudeImportance()`` (p = 2, group_reduction "mean", normalizer "mean", bias off)
scores unit j by the mean, over the group's parameterised layers, of their squared L2 norms
on j: ||producer.weight[j]||^2 (a conv's whole filter), the BatchNorm's gamma_j^2 (when
affine), and the consumer's squared input-column norms summed over the features of j (a
conv channel's positions after flatten); biases and BN's beta do not enter. The
"mean" normaliser divides all scores by their mean, which leaves the ranking unchanged.
``GroupTaylorImportance()`` scores the mean over the same layers of sum |w * dL/dw| over their
weights on j (a first-order Taylor estimate of the loss change, L the loss whose gradients
are stored); in 1.6.0 its normalisation-layer branch tests for GroupNorm's pruning function,
not BatchNorm's, so BatchNorm's gamma does not enter the Taylor score (the mean is then over
the producer and the consumer only).
"""
from __future__ import annotations

import copy
import importlib.util
import operator
from typing import Any, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from grouplasso import LassoStats, active_columns, active_groups, debias, group_norms, keep_groups
from models.attention import HeadAttention
from models.dependency import NeuronGroup
from models.layers import analyse_layer
from models.pruned import IndexedLinear

BASELINES = ("magnitude", "magnitude_refit", "activation", "lasso", "lasso_refit")
IMPORTANCES = ("magnitude", "taylor")


# ---------------------------------------------------------------------------------------------
# Equal-width weights from the layer's statistics
# ---------------------------------------------------------------------------------------------

def magnitude_scores(W: Tensor, group: int = 1) -> Tensor:
    """||W[:, group c]||_F for every group c: (K / group,) float64 (a 4-D conv weight is
    taken as its (D, C_in*kh*kw) view)."""
    return group_norms(_matrix(W).to(torch.float64), group)


def activation_scores(stats: LassoStats, W: Tensor) -> Tensor:
    """RMS over the training data of every group's contribution to the layer's output:
    sqrt(trace(W_c G_cc W_c^T)) = sqrt(mean_i ||W_c x_{i,c}||^2), (K / g,) float64 on
    ``stats``' device (g = 1: ||W[:, j]|| sqrt(G_jj)); see the module doc."""
    g, D, K = stats.group, stats.D, stats.K
    W = _matrix(W).to(device=stats.G.device, dtype=torch.float64)
    if g == 1:
        return W.square().sum(dim=0).mul(torch.diagonal(stats.G)).clamp(min=0).sqrt()
    m = K // g
    Wg = W.reshape(D, m, g)
    blocks = stats.G.reshape(m, g, m, g).diagonal(dim1=0, dim2=2)  # (g, g, m): G_cc for every c
    return torch.einsum("dca,abc,dcb->c", Wg, blocks, Wg).clamp(min=0).sqrt()


def top_groups(scores: Tensor, k: int, then: Optional[Tensor] = None) -> Tensor:
    """Indices (ascending) of the k largest ``scores``; ties broken by the larger ``then``
    (if given), then by the lowest index."""
    order = torch.arange(len(scores), device=scores.device)
    if then is not None:  # stable sorts, least significant key first
        order = order[torch.sort(then, descending=True, stable=True).indices]
    order = order[torch.sort(scores[order], descending=True, stable=True).indices]
    return torch.sort(order[:k]).values


def equal_width_weights(stats: LassoStats, W: Tensor, k: int, lasso_V: Optional[Tensor] = None) -> dict[str, Tensor]:
    """Weights (D, K) float64 on W's device for every baseline of the module doc, each with
    exactly ``k`` nonzero groups (``stats.group`` columns each). ``W``: the trained weight
    (D, K), or a Conv2d layer's 4-D weight, taken as its (D, C_in*kh*kw) view;
    ``lasso_V``: a lasso solution with exactly k nonzero groups (adds ``lasso`` and
    ``lasso_refit``). Scores tied at the k-th place keep the lowest indices.

    A refit leaves the kept columns whose inputs are zero on every training sample (G_jj = 0:
    dead neurons, whose weights do not affect the fit) as they were before the refit, so a
    kept dead group stays nonzero and the width stays k."""
    g, D, K = stats.group, stats.D, stats.K
    W = _matrix(W)
    if tuple(W.shape) != (D, K):
        raise ValueError(f"W has shape {tuple(W.shape)} but the statistics are for a ({D}, {K}) layer")
    m = K // g
    k = _width(k)
    if not 1 <= k <= m:
        raise ValueError(f"k = {k!r} neurons: must be an integer in 1..{m} (the layer's {K} inputs in groups of {g})")
    device = W.device
    W = W.detach().to(device=stats.G.device, dtype=torch.float64)
    nonzero = int((magnitude_scores(W, g) > 0).sum())
    if nonzero < k:
        raise ValueError(f"W has only {nonzero} nonzero groups of its {m}: no support of {k} nonzero groups exists")

    out: dict[str, Tensor] = {}
    magnitude = keep_groups(W, top_groups(magnitude_scores(W, g), k), g)
    out["magnitude"] = magnitude
    out["magnitude_refit"] = _refit(stats, magnitude)
    # Dead groups (score 0) with nonzero weights rank above groups of zero weights: only they
    # can be kept as nonzero groups (relevant only when fewer than k groups are alive).
    activation_support = top_groups(activation_scores(stats, W), k, then=(magnitude_scores(W, g) > 0).double())
    out["activation"] = _refit(stats, keep_groups(W, activation_support, g))
    if lasso_V is not None:
        lasso_V = _matrix(lasso_V)
        if tuple(lasso_V.shape) != (D, K):
            raise ValueError(f"lasso_V has shape {tuple(lasso_V.shape)}, expected ({D}, {K})")
        lasso = lasso_V.detach().to(device=stats.G.device, dtype=torch.float64).clone()
        have = len(active_groups(lasso, g))
        if have != k:
            raise ValueError(f"lasso_V has {have} nonzero groups, not k = {k}: pass the lasso solution of width {k}")
        out["lasso"] = lasso
        out["lasso_refit"] = _refit(stats, lasso)
    for name, V in out.items():
        have = len(active_groups(V, g))
        if have != k:  # only a refit whose least-squares optimum zeroes a live group (measure zero)
            raise ValueError(f"baseline {name!r} ended with {have} nonzero groups instead of {k}")
    return {name: V.to(device) for name, V in out.items()}


def _matrix(W: Tensor) -> Tensor:
    """A Conv2d weight (D, C_in, kh, kw) as the problem's (D, C_in*kh*kw) view; a matrix as it is."""
    return W.reshape(W.shape[0], -1) if W.ndim == 4 else W


def _width(k: object) -> int:
    """``k`` as an int (Python, NumPy or 0-dim torch integers); anything else is a ValueError."""
    if isinstance(k, bool):
        raise ValueError(f"k = {k!r} neurons: must be an integer")
    try:
        return operator.index(k)
    except TypeError:
        raise ValueError(f"k = {k!r} neurons: must be an integer") from None


def _refit(stats: LassoStats, V: Tensor) -> Tensor:
    """``debias`` of V on its nonzero groups, except the kept columns whose input is zero on
    every training sample (G_jj = 0, a dead neuron): they keep V's values. Their weights do not
    change the fit, the minimum-norm least-squares solution would make them zero (up to
    rounding noise), and a kept dead group would then vanish from the width."""
    refit = debias(stats, V).to(V)
    dead = torch.diagonal(stats.G).to(V.device) == 0
    if dead.any():
        kept = torch.zeros_like(dead)
        kept[active_columns(V, stats.group).to(V.device)] = True
        refit[:, kept & dead] = V[:, kept & dead]
    return refit


# ---------------------------------------------------------------------------------------------
# Torch-Pruning
# ---------------------------------------------------------------------------------------------

def torch_pruning_available() -> bool:
    """Whether the Torch-Pruning package (the ``bench`` extra) is installed."""
    return importlib.util.find_spec("torch_pruning") is not None


def _torch_pruning() -> Any:
    try:
        import torch_pruning as tp
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the Torch-Pruning baseline needs the torch-pruning package: pip install -e .[bench]"
        ) from err
    return tp


def torch_pruning_network(
    network: nn.Module,
    group: NeuronGroup,
    k: int,
    importance: str = "magnitude",
    *,
    example_inputs: Any,
    loss_batches: Optional[Iterable[tuple[Tensor, Tensor]]] = None,
) -> tuple[nn.Module, int]:
    """A copy of ``network`` whose group of neurons ``group`` keeps exactly ``k`` of its channels,
    pruned by Torch-Pruning: the first producer's output units (rows of a Linear, channels of a
    Conv2d; every other module of the group follows through Torch-Pruning's own dependency
    graph: BatchNorms, depthwise convolutions, the other producers and consumers of a residual
    stream) of lowest group importance are removed. Returns the copy and the number of neurons
    the first consumer reads afterwards, counted from the pruned module: a Linear layer's
    in_features / its positions, a Conv2d layer's in_channels.

    ``importance``: ``"magnitude"`` (``tp.importance.GroupMagnitudeImportance()``) or
    ``"taylor"`` (``GroupTaylorImportance()``, gradients of the cross-entropy summed over
    ``loss_batches``, an iterable of (images, labels), required then). ``example_inputs``:
    a batch the network accepts (the graph is built by tracing it). The network runs in eval
    mode for tracing and gradients (no BatchNorm statistics change; dropout off); the copy
    comes back in ``network``'s mode with no gradients. Ties in importance keep the lowest
    indices. Raises ``ValueError`` when Torch-Pruning's group would change any module outside
    ``group.modules`` (its dependency graph and ours disagree)."""
    tp = _torch_pruning()
    if importance not in IMPORTANCES:
        raise ValueError(f"importance {importance!r}: choose one of {', '.join(IMPORTANCES)}")
    if importance == "taylor" and loss_batches is None:
        raise ValueError("Taylor importance needs gradients: pass loss_batches, an iterable of (images, labels)")
    pruned = copy.deepcopy(network)
    modules = dict(pruned.named_modules())
    first = group.consumers[0]
    producer_name = group.producers[0]
    producer = modules[producer_name]
    if any(isinstance(modules[name], IndexedLinear) for name in group.modules):
        raise ValueError(
            f"the group of {first.name!r} has an IndexedLinear (an already compressed layer), which Torch-Pruning "
            "does not know how to prune: run the baseline on the uncompressed network"
        )
    units = producer.out_features if isinstance(producer, nn.Linear) else producer.out_channels
    K = units // group.units  # channels (neurons, or attention heads of group.units rows each)
    k = _width(k)
    if not 1 <= k <= K:
        raise ValueError(f"k = {k!r} neurons: must be an integer in 1..{K} ({producer_name!r} has {K} "
                         f"{'heads' if group.units > 1 else 'output units'})")
    allowed = {id(modules[name]) for name in group.modules}
    others = {name: _signature(m) for name, m in pruned.named_modules() if id(m) not in allowed}

    was_training = pruned.training
    requires_grad = {p: p.requires_grad for p in pruned.parameters()}
    device = next(pruned.parameters()).device
    pruned.eval()
    try:
        for p in pruned.parameters():
            p.requires_grad_(True)
            p.grad = None
        with torch.enable_grad():
            graph = tp.DependencyGraph().build_dependency(pruned, example_inputs=_to(example_inputs, device), verbose=False)
            if importance == "taylor":
                seen = 0
                for images, labels in loss_batches:
                    F.cross_entropy(pruned(_to(images, device)), _to(labels, device)).backward()
                    seen += 1
                if not seen:
                    raise ValueError("loss_batches is empty: Taylor importance needs at least one batch")
        fn = tp.prune_linear_out_channels if isinstance(producer, nn.Linear) else tp.prune_conv_out_channels
        tp_group = graph.get_pruning_group(producer, fn, idxs=list(range(units)))
        _check_group(tp_group, allowed, pruned, group)
        scorer = (tp.importance.GroupMagnitudeImportance() if importance == "magnitude"
                  else tp.importance.GroupTaylorImportance())
        scores = scorer(tp_group)
        if scores is None or scores.shape != (units,):
            raise RuntimeError(f"Torch-Pruning returned no importance for the {units} units of {producer_name!r}")
        scores = scores.detach().double().cpu().reshape(K, group.units).mean(dim=1)  # a head's: its units' mean
        drop = sorted(set(range(K)) - set(top_groups(scores, k).tolist()))
        if drop:
            rows = [c * group.units + u for c in drop for u in range(group.units)]
            prune_group = graph.get_pruning_group(producer, fn, idxs=rows)
            _check_group(prune_group, allowed, pruned, group)
            prune_group.prune()
            for name in group.channel_ops:  # Torch-Pruning leaves an attention's head count to its user
                if isinstance(modules[name], HeadAttention):
                    modules[name].num_heads = k
    finally:
        for p, flag in requires_grad.items():
            p.requires_grad_(flag)
        for p in pruned.parameters():
            p.grad = None
        pruned.train(was_training)

    changed = [name for name, m in pruned.named_modules() if name in others and _signature(m) != others[name]]
    if changed:  # the group check above should make this impossible
        raise RuntimeError(f"Torch-Pruning changed {', '.join(changed)} besides the group of {first.name!r}")
    layer = pruned.get_submodule(first.name)
    features = layer.in_channels if isinstance(layer, nn.Conv2d) else layer.in_features
    if features % first.positions:
        raise RuntimeError(f"{first.name!r} reads {features} features, not a multiple of {first.positions}")
    return pruned, features // first.positions


def torch_pruning_at_widths(network: nn.Module, widths: dict[str, int], importance: str, *, example_inputs: Any,
                            loss_batches: Optional[Iterable[tuple[Tensor, Tensor]]] = None) -> nn.Module:
    """``network`` with the neurons feeding every layer of ``widths`` (module path -> width, in
    network order, as a compression report lists them) pruned to that width by Torch-Pruning,
    one group after the other (``torch_pruning_network``), in eval mode."""
    pruned = network
    for module, k in widths.items():
        pruned, kept = torch_pruning_network(pruned, analyse_layer(pruned, module), k, importance,
                                             example_inputs=example_inputs, loss_batches=loss_batches)
        if kept != k:
            raise RuntimeError(f"Torch-Pruning left {kept} neurons feeding {module!r}, not {k}")
    return pruned.eval()


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {key: _to(v, device) for key, v in value.items()}
    return value


def _signature(module: nn.Module) -> tuple:
    """The shapes of a module's own parameters and buffers (what pruning would change)."""
    own = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
    return tuple((name, tuple(t.shape)) for name, t in own)


def _check_group(tp_group: Any, allowed: set[int], network: nn.Module, group: NeuronGroup) -> None:
    """Refuse a Torch-Pruning group that would prune anything outside ``group``'s modules
    (parameter-free operations such as ReLU, pooling and flatten are fine)."""
    names = {id(m): name for name, m in network.named_modules()}
    for item in tp_group:
        target = item.dep.target.module
        if id(target) in allowed:
            continue
        if isinstance(target, nn.Parameter) or (isinstance(target, nn.Module) and (
                any(True for _ in target.parameters()) or any(True for _ in target.buffers()))):
            what = names.get(id(target), type(target).__name__)
            raise ValueError(
                f"removing output units of {group.producers[0]!r} would also change {what!r} (Torch-Pruning's "
                f"dependency group), which is not in the group of {group.name!r} ({', '.join(group.modules)})"
            )
