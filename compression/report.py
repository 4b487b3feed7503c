"""The before/after report of a compression: a table to read, JSON to keep, TensorBoard to browse."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import matplotlib.pyplot as plt
from matplotlib.figure import Figure


def _change(before: float, after: float) -> str:
    return f"{100.0 * (after - before) / before:+.1f}%" if before else ""


def format_report(report: dict[str, Any]) -> str:
    """A plain-text table: before/after summary, one row per compressed layer, and any paths."""
    b, a = report["before"], report["after"]
    lines = [f"{'':28s}{'before':>14s}{'after':>14s}{'change':>10s}"]
    lines.append(f"{'train loss':28s}{b['train_loss']:14.4f}{a['train_loss']:14.4f}{_change(b['train_loss'], a['train_loss']):>10s}")
    for key, label in (("val_accuracy", "validation accuracy"), ("test_accuracy", "test accuracy")):
        if key in b and key in a:
            lines.append(f"{label:28s}{100 * b[key]:13.2f}%{100 * a[key]:13.2f}%{100 * (a[key] - b[key]):+9.2f}pt")
    if "held_out" in report:
        h = report["held_out"]
        lines.append(f"{'held-out val. accuracy':28s}{100 * h['original_accuracy']:13.2f}%{100 * h['accuracy']:13.2f}%"
                     f"{-h['drop']:+9.2f}pt   ({h['images']} validation images no choice saw; "
                     f"{len(h['given_back'])} cut(s) given back)")
    if "final_refit" in report:
        f = report["final_refit"]
        lines.append(f"{'val. accuracy, final refit':28s}{100 * f['val_accuracy_before']:13.2f}%"
                     f"{100 * f['val_accuracy_after']:13.2f}%"
                     f"{100 * (f['val_accuracy_after'] - f['val_accuracy_before']):+9.2f}pt   "
                     f"({len(f['layers'])} layers refit to the original's outputs in {f['seconds']:.0f} s; "
                     + ("kept)" if f["kept"] else "not kept)"))
    if "after_surgery" in report:
        s, tuned = report["after_surgery"], report["finetune"]
        lines.append(f"{'test accuracy after surgery':28s}{'':14s}{100 * s['test_accuracy']:13.2f}%"
                     f"{100 * (s['test_accuracy'] - b['test_accuracy']):+9.2f}pt   "
                     f"(then {tuned['epochs']} fine-tuning epochs, lr {tuned['lr']:g}"
                     + (", annealed" if tuned.get("anneal") else "")
                     + (f", batches of {tuned['batch_size']}" if "batch_size" in tuned else "") + ")")
    if len(report["layers"]) <= 12:
        for entry in report["layers"]:
            label = f"width into {entry['module']}"
            lines.append(f"{label:28s}{entry['width_before']:14d}{entry['width_after']:14d}"
                         f"{_change(entry['width_before'], entry['width_after']):>10s}")
    else:  # the per-layer table below has them all
        before = sum(e["width_before"] for e in report["layers"])
        after = sum(e["width_after"] for e in report["layers"])
        label = f"widths of {len(report['layers'])} groups"
        lines.append(f"{label:28s}{before:14d}{after:14d}{_change(before, after):>10s}")
    for key, label, fmt in (("parameters", "parameters", "{:14,d}"), ("macs", "multiply-adds / sample", "{:14,d}"),
                            ("latency_ms", "latency (ms, batch 1)", "{:14.2f}")):
        lines.append(f"{label:28s}{fmt.format(b[key])}{fmt.format(a[key])}{_change(b[key], a[key]):>10s}")
    lines.append("")
    name = max([len(e["layer"]) + 1 for e in report["layers"]] + [8])
    module = max([len(e["module"]) + 1 for e in report["layers"]] + [14])
    lines.append(f"{'layer':{name}s}{'module':{module}s}{'by':>9s}{'lambda':>10s}{'lam_max':>10s}{'ratio':>9s}"
                 f"{'kept':>12s}{'MSE':>11s}{'rel. gap':>10s}{'steps':>7s}{'solve s':>9s}{'stats s':>9s}  stop")
    for e in report["layers"]:
        lines.append(
            f"{e['layer']:{name}s}{e['module']:{module}s}{e['chosen_by']:>9s}{e['lambda']:10.3g}{e['lambda_max']:10.3g}"
            f"{e['ratio']:9.3g}{e['width_after']:>6d}/{e['width_before']:<5d}"
            f"{e['mse']:11.3e}{e['rel_gap']:10.1e}{e['steps']:7d}{e['seconds']:9.2f}{e['stats_seconds']:9.1f}  "
            f"{e['stop'].split(':')[0]}"
        )
    if "export" in report:
        lines.append("")
        lines += format_export(report["export"])
    if "cache" in report and report["cache"].get("dir"):
        c = report["cache"]
        limit = f", limit {c['max_bytes'] / 1e9:.1f} GB" if c.get("max_bytes") else ""
        lines.append(f"cache {c['dir']}: read {c['read'] / 1e6:,.1f} MB, wrote {c['written'] / 1e6:,.1f} MB, "
                     f"evicted {c['evicted'] / 1e6:,.1f} MB{limit}")
    if "allocation" in report:
        lines.append("")
        lines += format_allocation(report["allocation"])
    for e in report["layers"]:
        if "certified_same_width" in e:
            c = e["certified_same_width"]
            same = c.get("same_lambda", {})
            if same:
                lines.append(f"{e['layer']}: at the paper's lambda {same['lambda']:.3g} the certified optimum keeps "
                             f"{same['width']} neurons (MSE {same['mse']:.3e}); the paper's procedure kept {e['active']} "
                             f"(MSE {e['mse']:.3e}, objective {e['objective']:.4g})")
            if c["width"] is None:  # the same-lambda solve used the comparison's time
                lines.append(f"{e['layer']}: the certified optimum of the same width: {c['resolved']}")
            else:
                lines.append(f"{e['layer']}: the certified optimum with {c['width']} neurons: lambda "
                             f"{c.get('lambda', 0):.3g}, MSE {c.get('mse', float('nan')):.3e}"
                             + (f" ({c['resolved']})" if "resolved" in c else ""))
        if e.get("candidates"):
            lines.append("")
            floor = f", validation floor {100 * e['val_accuracy_floor']:.2f}%" if "val_accuracy_floor" in e else ""
            lines.append(f"search of {e['layer']} ({len(e['candidates'])} certified candidates{floor}):")
            lines.append(f"{'lambda':>10s}{'ratio':>10s}{'width':>7s}{'val acc':>9s}{'rel. gap':>10s}{'s':>7s}")
            for c in e["candidates"]:
                acc = f"{100 * c['val_accuracy']:8.2f}%" if "val_accuracy" in c else f"{'':9s}"
                lines.append(f"{c['lambda']:10.3g}{c['ratio']:10.3g}{c['width']:7d}{acc}{c['rel_gap']:10.1e}"
                             f"{c['seconds']:7.1f}")
    for layer, rows in report.get("paths", {}).items():
        lines.append("")
        lines.append(f"regularisation path of {layer}:")
        lines.append(f"{'lambda':>10s}{'active':>8s}{'MSE':>11s}{'test acc':>10s}{'rel. gap':>10s}{'steps':>7s}{'s':>7s}")
        for r in rows:
            lines.append(f"{r['lambda']:10.3g}{r['active']:8d}{r['mse']:11.3e}{100 * r['test_accuracy']:9.2f}%"
                         f"{r['rel_gap']:10.1e}{r['steps']:7d}{r['seconds']:7.1f}")
    for layer, rows in report.get("baselines", {}).items():
        lines.append("")
        lines += format_baselines(layer, rows)
    return "\n".join(lines)


def format_export(export: dict[str, Any]) -> list[str]:
    """The exported files, how far each is from PyTorch, and the deployment latencies."""
    lines = []
    for fmt in ("onnx", "torchscript"):
        for name, f in export.get(fmt, {}).items():
            lines.append(f"{fmt:11s} {name:10s} {f['file']}  max |difference| {f['max_abs_difference']:.1e} "
                         f"({f['max_rel_difference']:.1e} relative)")
    if "onnx_latency_ms" in export:
        ort, pt = export["onnx_latency_ms"], export["torch_latency_ms"]
        lines.append(f"{'latency (ms, CPU)':28s}{'original':>12s}{'compressed':>12s}{'ratio':>9s}")
        for label, table in (("ONNX Runtime", ort), ("PyTorch", pt)):
            for batch in (1, 64):
                a, b = table["original"][_key(table["original"], batch)], table["compressed"][_key(table["compressed"], batch)]
                lines.append(f"{label + f', batch {batch}':28s}{a:12.2f}{b:12.2f}{'1/' + format(a / b, '.2f'):>9s}")
    return lines


def _key(table: dict, batch: int) -> Any:
    """Batch sizes are ints in memory and strings once read back from report.json."""
    return batch if batch in table else str(batch)


def format_allocation(allocation: dict[str, Any]) -> list[str]:
    """The budget shared by what each group's candidates buy: every knapsack choice tried and
    what the whole network lost with it."""
    n = allocation["validation_images"]
    lines = [f"budget {allocation['budget_points']:g} points = {allocation['budget_images']} of {n} validation "
             f"images, shared by multiply-adds saved per image lost (knapsack, then re-validated):",
             f"{'budget':>8s}{'predicted':>11s}{'lost':>8s}{'val acc':>10s}{'MACs saved (pred.)':>20s}  within"]
    for t in allocation["tries"]:
        # a knapsack try names its budget; a bisection over the first choice, its prefix
        what = f"{t['budget_images']:8d}" if "budget_images" in t else f"{'prefix':>8s}"
        lines.append(f"{what}{t['predicted_images_lost']:11d}{t['images_lost']:8.0f}"
                     f"{100 * t['val_accuracy']:9.2f}%{t['macs_saved_predicted']:20,.0f}  "
                     f"{'yes' if t['within_budget'] else 'no'}{'  ' + t['prefix'] if 'prefix' in t else ''}")
    return lines


def plot_widths(report: dict[str, Any]) -> Figure:
    """The kept fraction of every compressed group, in network order (the chosen widths of a
    budget over many layers), each bar labelled kept/before; coupled groups in orange."""
    entries = report["layers"]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.3 * len(entries) + 2), 4.5))
    x = list(range(len(entries)))
    kept = [e["width_after"] / e["width_before"] if e["width_before"] else 1.0 for e in entries]
    ax.bar(x, kept, color=["tab:orange" if "stacked" in e else "tab:blue" for e in entries])
    for i, e in enumerate(entries):
        ax.annotate(f"{e['width_after']}/{e['width_before']}", (i, kept[i]), ha="center", va="bottom", fontsize=6,
                    rotation=90 if len(entries) > 12 else 0, xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(x)
    ax.set_xticklabels([e["layer"] for e in entries], rotation=90, fontsize=7)
    ax.set_ylabel("kept fraction of the neurons / channels")
    ax.set_ylim(0, 1.15)
    ax.grid(axis="y", alpha=0.3)
    before, after = report["before"]["macs"], report["after"]["macs"]
    ax.set_title(f"widths chosen per group (orange: coupled residual channels)\nmultiply-adds {_count(before)} -> "
                 f"{_count(after)} ({before / max(after, 1):.2f}x fewer)", fontsize=9)
    fig.tight_layout()
    return fig


def _count(n: float) -> str:
    return f"{n / 1e9:.2f} G" if n >= 1e9 else f"{n / 1e6:.1f} M" if n >= 1e6 else f"{n / 1e3:.1f} k"


def format_baselines(layer: str, rows: list[dict[str, Any]]) -> list[str]:
    """Test accuracy of every method (columns) at every width (rows), no fine-tuning."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lines = [f"baselines at equal width for {layer} (test accuracy, no fine-tuning; * = best):",
             f"{'width':>7s}" + "".join(f"{m[:15]:>16s}" for m in methods)]
    for width in sorted({r["width"] for r in rows}, reverse=True):
        cells = {r["method"]: r["test_accuracy"] for r in rows if r["width"] == width}
        best = max(cells.values())
        lines.append(f"{width:7d}" + "".join(
            f"{100 * cells[m]:14.2f}%{'*' if cells[m] == best else ' '}" if m in cells else f"{'':16s}"
            for m in methods))
    return lines


def plot_path(layer: str, rows: list[dict[str, Any]], baselines: Optional[list[dict[str, Any]]] = None) -> Figure:
    """Width against test accuracy and against the layer's train MSE: the regularisation path
    (points labelled by lambda) and, when given, one line per baseline at the same widths."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    lines = {"lasso path": [(r["active"], r["test_accuracy"], r["mse"]) for r in rows]}
    for r in baselines or []:
        if r["method"] != "lasso":  # the path's own points
            lines.setdefault(r["method"], []).append((r["width"], r["test_accuracy"], r.get("train_mse")))
    for name, points in lines.items():
        points = sorted(points)
        style = {"linewidth": 2.5} if name == "lasso path" else {"linewidth": 1, "alpha": 0.85}
        axes[0].plot([w for w, _, _ in points], [100 * a for _, a, _ in points], "o-", label=name, **style)
        if all(m is not None for _, _, m in points):
            axes[1].plot([w for w, _, _ in points], [m for _, _, m in points], "o-", label=name, **style)
    for r in rows:
        axes[0].annotate(f"λ={r['lambda']:.2g}", (r["active"], 100 * r["test_accuracy"]), textcoords="offset points",
                         xytext=(4, 4), fontsize=7)
    for ax, label in ((axes[0], "test accuracy (%)"), (axes[1], "train MSE of the layer's outputs")):
        ax.set_xlabel(f"neurons kept (width into {layer})")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if max((r["active"] for r in rows), default=0) > 64:
            ax.set_xscale("log", base=2)
    axes[1].set_yscale("log")
    if baselines:
        axes[0].legend(fontsize=8)
    fig.suptitle(f"Regularisation path: {layer}" + (" against the baselines at equal width" if baselines else ""))
    fig.tight_layout()
    return fig


def write_report(report: dict[str, Any], run_dir: Path, extra_path: Optional[str] = None, logger: Any = None) -> list[Path]:
    """``report.json`` (and ``extra_path``), ``path-<layer>.png`` per path, and TensorBoard entries."""
    run_dir.mkdir(parents=True, exist_ok=True)
    written = [run_dir / "report.json"] + ([Path(extra_path)] if extra_path else [])
    for target in written:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(report, indent=2))
    for layer, rows in report.get("paths", {}).items():
        fig = plot_path(layer, rows, report.get("baselines", {}).get(layer))
        fig.savefig(run_dir / f"path-{layer}.png", dpi=120)
        written.append(run_dir / f"path-{layer}.png")
        if logger is not None:
            logger.experiment.add_figure(f"path/{layer}", fig)
        plt.close(fig)
    if len(report["layers"]) > 1:
        fig = plot_widths(report)
        fig.savefig(run_dir / "widths.png", dpi=120)
        written.append(run_dir / "widths.png")
        if logger is not None:
            logger.experiment.add_figure("widths", fig)
        plt.close(fig)
    if logger is not None:
        experiment = logger.experiment
        experiment.add_text("report", "    " + format_report(report).replace("\n", "\n    "))
        for stage in ("before", "after"):
            for key in ("train_loss", "test_accuracy", "parameters", "macs", "latency_ms"):
                experiment.add_scalar(f"report/{key}", report[stage][key], 0 if stage == "before" else 1)
        for entry in report["layers"]:
            experiment.add_scalar(f"report/width/{entry['layer']}", entry["width_before"], 0)
            experiment.add_scalar(f"report/width/{entry['layer']}", entry["width_after"], 1)
        experiment.flush()
    return written
