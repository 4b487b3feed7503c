"""Naming the layers to compress, and the table of what can be compressed.

A *layer* here is a Linear or Conv2d module; compressing it removes the neurons (channels)
that feed it, with every module that changes with them: the ``NeuronGroup`` that
``models.dependency`` finds. Layers are named by module path (``classifier.4``,
``layer2.0.conv1``), by a short name of the architecture (``pen``, ``conv3``:
``models.registry.LAYER_ALIASES``; in a transformer, ``<block>.mlp`` and ``<block>.heads``:
``block_names``), by ``all`` (every compressible layer) or by a glob pattern
(``layer*.*.conv2``, ``features.*``, ``encoder_layer_*.mlp``), which selects the compressible
layers it matches, by module path or short name, in network order. Several named layers that
read the same group (the consumers of one residual stream) are one compression.
"""
from __future__ import annotations

import fnmatch
from typing import Any, Optional, Sequence

from torch import nn

from models.attention import HeadAttention
from models.dependency import Consumer, LayerError, NetworkAnalysis, NeuronGroup, analyse_network
from models.registry import LAYER_ALIASES

__all__ = ["LayerError", "analyse_layer", "group_width", "layer_table", "format_layer_table", "resolve_layers",
           "resolve_layer_name", "compressible_layers"]


def _aliases(arch: Any, model: nn.Module, analysis: NetworkAnalysis) -> dict[str, str]:
    """Short name -> module path: the architecture's own (``LAYER_ALIASES``) and the transformer
    blocks' (``block_names``)."""
    return {**(LAYER_ALIASES.get(arch, {}) if isinstance(arch, str) else {}), **block_names(model, analysis)}


def block_names(model: nn.Module, analysis: NetworkAnalysis) -> dict[str, str]:
    """Short names of a transformer's compressible groups, by the block that holds them:
    ``<block>.heads`` for an attention's heads (the layer read: its ``out_proj``) and
    ``<block>.mlp`` for an MLP's hidden neurons (a group made and read by Linear layers only;
    the layer read: the MLP's output layer). The block is the nearest module holding both the
    group and an attention (torchvision's ``EncoderBlock``, a Llama block), named by the
    shortest end of its path that is unique and not a bare number (``encoder_layer_3`` for
    ``encoder.layers.encoder_layer_3``, ``blocks.3`` for ``blocks.3``); a block at the top of
    the network gives ``heads`` and ``mlp``. Names that two groups would share are left out.
    Empty for a network without attention."""
    attention = [name for name, m in model.named_modules() if isinstance(m, HeadAttention)]
    if not attention:
        return {}
    modules = dict(model.named_modules())

    def block(paths: Sequence[str]) -> Optional[str]:
        """The nearest common ancestor of ``paths`` that holds an attention module."""
        common = _common_parent(paths)
        while True:
            if any(a == common or a.startswith(common + ".") if common else True for a in attention):
                return common
            if not common:
                return None
            common = common.rpartition(".")[0]

    found: dict[str, list[str]] = {}  # (block, kind) as "block|kind" -> consumers
    for layer in compressible_layers(analysis):
        group = analysis.reads[layer]
        if layer != group.consumers[0].name:
            continue
        if group.units > 1:
            kind, where = "heads", block([group.consumers[0].name.rpartition(".")[0]])  # the attention's parent
        elif len(group.consumers) == 1 and all(isinstance(modules[m], nn.Linear) for m in group.modules):
            kind, where = "mlp", block(group.modules)
        else:
            continue
        if where is not None:
            found.setdefault(f"{where}|{kind}", []).append(layer)
    blocks = sorted({key.partition("|")[0] for key in found})
    names: dict[str, list[str]] = {}
    for key, layers in found.items():
        where, _, kind = key.partition("|")
        short = _short_path(where, blocks)
        names.setdefault(f"{short}.{kind}" if short else kind, []).extend(layers)
    return {name: layers[0] for name, layers in names.items() if len(layers) == 1}


def _common_parent(paths: Sequence[str]) -> str:
    """The longest module path that is a parent of every one of ``paths`` ('' for the root)."""
    parts = [p.split(".")[:-1] for p in paths]
    common: list[str] = []
    for level in zip(*parts):
        if len(set(level)) > 1:
            break
        common.append(level[0])
    return ".".join(common)


def _short_path(path: str, others: Sequence[str]) -> str:
    """The shortest end of ``path`` that ends no other of ``others`` and is not a bare number."""
    parts = path.split(".") if path else []
    for n in range(1, len(parts) + 1):
        end = ".".join(parts[-n:])
        if parts[-n].isdigit() and n < len(parts):
            continue
        if not any(o != path and (o == end or o.endswith("." + end)) for o in others):
            return end
    return path


def compressible_layers(analysis: NetworkAnalysis) -> list[str]:
    """The layers, in forward order, whose input neurons can be removed."""
    return [layer for layer in analysis.layers if layer in analysis.reads and layer not in analysis.refused
            and analysis.reads[layer].compressible]


def _valid_names(analysis: NetworkAnalysis, aliases: dict[str, str]) -> str:
    """'compressible layers: ...; not compressible: ...; short names: ...' for error messages."""
    good = compressible_layers(analysis)
    parts = [f"compressible layers: {', '.join(good) or 'none'}"]
    bad = [layer for layer in analysis.layers if layer not in good]
    if bad:
        parts.append("not compressible: " + ", ".join(f"{layer} ({_reason(analysis, layer)})" for layer in bad[:12])
                     + (f", ... ({len(bad) - 12} more)" if len(bad) > 12 else ""))
    if aliases:
        parts.append("short names: " + ", ".join(f"{alias} = {target}" for alias, target in aliases.items()))
    parts.append("'all' or a glob pattern (layer*.*.conv2) selects several")
    return "; ".join(parts)


def _reason(analysis: NetworkAnalysis, layer: str) -> str:
    try:
        analysis.group_of(layer)
    except LayerError as err:
        return err.reason
    return "compressible"


def resolve_layer_name(model: nn.Module, name: str, arch: Any = None,
                       analysis: Optional[NetworkAnalysis] = None) -> str:
    """The module path of one layer named by a short name or a module path, after checking that
    its input neurons can be removed; ``LayerError`` otherwise, naming the reason and listing
    the compressible layers and the short names."""
    analysis = analysis or analyse_network(model)
    aliases = _aliases(arch, model, analysis)
    path = aliases.get(name, name)
    module = dict(model.named_modules()).get(path)
    if not isinstance(module, (nn.Linear, nn.Conv2d)):
        kind = "is not a Linear or Conv2d layer" if module is not None else "does not exist in this network"
        raise LayerError(f"layer {name!r} {kind}. {_valid_names(analysis, aliases)}")
    try:
        analysis.group_of(path)
    except LayerError as err:
        shown = name if name == path else f"{name} ({path})"
        raise LayerError(f"layer {shown} cannot be compressed: {err.reason}. {_valid_names(analysis, aliases)}",
                         reason=err.reason) from err
    return path


def resolve_layers(model: nn.Module, names: Sequence[str], arch: Any = None,
                   analysis: Optional[NetworkAnalysis] = None) -> list[str]:
    """Module paths for ``names`` (short names, module paths, ``all``, glob patterns), each once,
    in the order given (a pattern contributes its compressible matches in network order)."""
    analysis = analysis or analyse_network(model)
    aliases = _aliases(arch, model, analysis)
    short = {path: alias for alias, path in aliases.items()}
    out: list[str] = []
    for name in names:
        if name == "all" or any(ch in name for ch in "*?["):
            pattern = "*" if name == "all" else name
            matches = [layer for layer in compressible_layers(analysis) if fnmatch.fnmatchcase(layer, pattern)
                       or fnmatch.fnmatchcase(short.get(layer, ""), pattern)]
            if not matches:
                raise LayerError(f"no compressible layer matches {name!r}. {_valid_names(analysis, aliases)}")
            out += matches
        else:
            out.append(resolve_layer_name(model, name, arch, analysis))
    return list(dict.fromkeys(out))


def analyse_layer(model: nn.Module, name: str, analysis: Optional[NetworkAnalysis] = None) -> NeuronGroup:
    """The ``NeuronGroup`` feeding layer ``name`` (a module path); ``LayerError`` with the reason
    when its inputs cannot be removed."""
    analysis = analysis or analyse_network(model)
    if name not in analysis.reads and name not in analysis.refused:
        module = dict(model.named_modules()).get(name)
        kind = "is not a Linear or Conv2d layer" if module is not None else "does not exist in this network"
        raise LayerError(f"layer {name!r} {kind}. {_valid_names(analysis, {})}")
    return analysis.group_of(name)


def consumer_columns(model: nn.Module, consumer: Consumer) -> int:
    """Columns of a consumer's problem V: its weight's entries per output (in_features, or
    in_channels * kh * kw)."""
    return model.get_submodule(consumer.name).weight[0].numel()


def group_width(model: nn.Module, group: NeuronGroup) -> int:
    """The width a target counts for ``group``: its channels, or for a single consumer the
    groups of that consumer's columns (an already compressed ``IndexedLinear`` counts the
    features it reads, not the channels they come from)."""
    if len(group.consumers) == 1:
        consumer = group.consumers[0]
        return consumer_columns(model, consumer) // consumer.group
    return group.width


def layer_table(model: nn.Module, analysis: Optional[NetworkAnalysis] = None,
                macs: Optional[dict[str, int]] = None) -> list[dict[str, Any]]:
    """One row per Linear and Conv2d layer in forward order: ``layer``, ``kind``, ``compressible``,
    ``reason`` (why not), ``width`` (input neurons or channels), ``group`` (columns per neuron in
    the layer's problem), ``coupled`` (the other layers that change with its input neurons),
    ``macs`` and ``macs_share`` (of the whole network, when ``macs`` per module is given),
    ``short`` (its short name in a transformer, ``block_names``, else None)."""
    analysis = analysis or analyse_network(model)
    modules = dict(model.named_modules())
    short = {path: name for name, path in block_names(model, analysis).items()}
    total = sum(macs.values()) if macs else 0
    rows = []
    for layer in analysis.layers:
        module = modules[layer]
        row: dict[str, Any] = {"layer": layer, "kind": "conv" if isinstance(module, nn.Conv2d) else "linear",
                               "compressible": False, "reason": None, "width": None, "group": None, "coupled": [],
                               "short": short.get(layer)}
        group = analysis.reads.get(layer)
        try:
            analysis.group_of(layer)
            row["compressible"] = True
        except LayerError as err:
            row["reason"] = err.reason
        if group is not None and layer not in analysis.refused:
            row["width"] = group.width or None  # 0: the width of a group that is refused early is not known
            own = next((c for c in group.consumers if c.name == layer), None)
            row["group"] = own.group if own else None
            row["coupled"] = [m for m in group.modules if m != layer]
        if macs is not None:
            row["macs"] = int(macs.get(layer, 0))
            row["macs_share"] = row["macs"] / total if total else 0.0
        rows.append(row)
    return rows


def format_layer_table(rows: list[dict[str, Any]]) -> str:
    """The table ``compress.py --list_layers`` prints."""
    with_macs = any("macs" in r for r in rows)
    names = [r["layer"] + (f" [{r['short']}]" if r.get("short") else "") for r in rows]
    width = max([len(n) for n in names] + [5])
    header = f"{'layer':{width}s} {'kind':6s} {'inputs':>7s} {'group':>6s}" + (f" {'MACs':>7s}" if with_macs else "")
    lines = [header + "  compressible / coupled with"]
    for r, name in zip(rows, names):
        line = f"{name:{width}s} {r['kind']:6s} {r['width'] if r['width'] is not None else '-':>7} " \
               f"{r['group'] if r['group'] is not None else '-':>6}"
        if with_macs:
            line += f" {100 * r.get('macs_share', 0):6.2f}%"
        if r["compressible"]:
            coupled = r["coupled"]
            shown = ", ".join(coupled[:6]) + (f", ... ({len(coupled) - 6} more)" if len(coupled) > 6 else "")
            line += "  yes" + (f"; with {shown}" if coupled else "")
        else:
            line += f"  no: {r['reason']}"
        lines.append(line)
    good = sum(r["compressible"] for r in rows)
    lines.append(f"{good} of {len(rows)} layers can be compressed ('inputs': neurons or channels feeding the layer, "
                 "or attention heads; 'group': columns of its weight per input; [short name] for --layers)")
    return "\n".join(lines)
