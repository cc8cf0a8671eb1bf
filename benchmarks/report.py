"""Turn a results JSON of `fastbert bench` into a markdown table and PNG plots, and
refresh the performance table of the README from the latest results.

    python -m benchmarks.report [RESULTS.json] [--out DIR] [--readme README.md] [--summary]

RESULTS.json defaults to the newest kernels.json under benchmarks/results/<date>-<gpu>/
(newest by the run's recorded start time). --out DIR writes DIR/kernels.md (every row)
and DIR/kernels.png (per op: speed-up over eager against seqlen, one line per implementation,
above % of the measured ceiling; see plot()); given an e2e.json, DIR/e2e.md and DIR/e2e.png
(benchmarks/bench_e2e.py: speed-up over transformers eager and MFU per model case and
implementation). --readme FILE replaces
the text between the markers
    <!-- fastbert-bench:start -->
    <!-- fastbert-bench:end -->
with the summary table (the key shapes), the e2e summary (the e2e.json beside
RESULTS.json, else the newest one) and where each of issue 6's targets stands.
--summary prints that block.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
START, END = "<!-- fastbert-bench:start -->", "<!-- fastbert-bench:end -->"
IMPL_ORDER = ["triton", "cuda", "triton_fa2d", "cuda_fa2d", "eager", "compile", "sdpa_flash", "sdpa_efficient",
              "sdpa_cudnn", "sdpa_math", "outer_sum", "outer_sum_compile", "python_nbest"]
OP_ORDER = ["attention", "add_layernorm", "add_layernorm_amp", "layernorm_gelu", "bias_gelu", "span_score"]
MODE_ORDER = ["fwd", "bwd", "fwd+bwd"]


def _started(path: Path) -> str:
    """When the run of a results JSON started (meta.started_utc, ISO: sorts as text); the folder's
    date when the JSON does not say. Not the file's mtime: a fresh clone gives every file the same."""
    try:
        started = load(path).get("meta", {}).get("started_utc")
    except (OSError, ValueError):
        started = None
    return started or path.parent.name[:10]


def latest_results(root: Path = RESULTS, name: str = "kernels.json") -> Path:
    """The newest <name> under root/<YYYY-MM-DD>-<gpu>/, by the start time its run recorded
    (two runs of one day, on two GPUs, are ordered by time, not by GPU name)."""
    found = sorted(root.glob(f"*/{name}"), key=lambda p: (_started(p), p.parent.name))
    if not found:
        raise FileNotFoundError(f"no results under {root} (expected {root}/<date>-<gpu>/{name})")
    return found[-1]


def is_e2e(data: dict) -> bool:
    return data.get("meta", {}).get("suite") == "e2e"


def load(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def _rank(value, order):
    return order.index(value) if value in order else len(order)


def _sorted_rows(rows):
    return sorted(rows, key=lambda r: (_rank(r["op"], OP_ORDER), r["dtype"], (r.get("dims") or {}).get("S") or 0,
                                       r["shape"], _rank(r["mode"], MODE_ORDER), _rank(r["impl"], IMPL_ORDER)))


def _num(x, fmt):
    return "" if x is None else format(x, fmt)


def _ms(r):
    if r["status"] != "ok":
        return r["status"]
    return f"{r['ms']:.4g} [{r['ms_p20']:.4g}, {r['ms_p80']:.4g}]"


def group_by_case(rows) -> dict:
    """{(op, shape, dtype, mode): {impl: row}}, in the rows' order."""
    groups = {}
    for r in rows:
        groups.setdefault((r["op"], r["shape"], r["dtype"], r["mode"]), {})[r["impl"]] = r
    return groups


HOST_BOUND = "host-bound:"        # what harness.run_case puts in the note of such a row


def host_bound(r: dict) -> bool:
    """The row's GPU time is shorter than the host's time to issue the call."""
    return HOST_BOUND in (r.get("note") or "")


def timing_cells(by_impl, impls, baseline, speedup_format=".3g") -> list[str]:
    """One table cell per impl: "ms (x baseline)", marked † when host-bound, the row's status when it
    did not run, or ""."""
    cells = []
    for impl in impls:
        r = by_impl.get(impl)
        if r is None:
            cells.append("")
        elif r["status"] != "ok":
            cells.append(r["status"])
        else:
            speed = (f" ({r['speedup_vs_eager']:{speedup_format}}x)"
                     if r["speedup_vs_eager"] is not None and impl != baseline else "")
            cells.append(f"{r['ms']:.3g} ms{speed}" + (" †" if host_bound(r) else ""))
    return cells


def legend(baseline: str) -> str:
    return (f"Each cell: the median time of one call and, in brackets, the speed-up over {baseline} measured "
            f"in the same run. † host-bound: issuing the call takes the host longer than the GPU takes to "
            f"run it, so a loop of such calls runs at the host's pace (the full table gives the issue time).")


def header(data: dict) -> str:
    env, ceil, meta = data["env"], data.get("ceilings", {}), data.get("meta", {})
    lines = [
        f"GPU **{env.get('gpu')}** (driver {env.get('driver')}), torch {env.get('torch')}, "
        f"triton {env.get('triton')}, CUDA {env.get('cuda')}, commit `{env.get('commit')}`, "
        f"{meta.get('started_utc', '')}, profile `{meta.get('profile', '')}`.",
    ]
    if ceil:
        lines.append(f"Measured ceilings: copy {ceil.get('copy_GBps', 0):.0f} GB/s (bytes read + written), "
                     f"matmul {ceil.get('matmul_TFLOPs', 0):.1f} TFLOP/s ({ceil.get('matmul_shape', '')}).")
    if data.get("skipped_for_time"):
        lines.append(f"{len(data['skipped_for_time'])} case groups were skipped by the time limit.")
    return "\n\n".join(lines)


def markdown(data: dict) -> str:
    """Every row, one table per op."""
    out = ["# Kernel benchmarks", "", header(data), "",
           "ms: median [p20, p80] of CUDA-event times per call (rows noted \"host timer\": host "
           "wall-clock time, the Python n-best); metric: GB/s (memory-bound ops) or TFLOP/s "
           "(attention), from each op's bytes/FLOPs formula (benchmarks/bench_*.py); % ceil: of the measured "
           "copy bandwidth or matmul rate; x eager: eager ms / ms, same run.", ""]
    rows = _sorted_rows(data["rows"])
    for op in sorted({r["op"] for r in rows}, key=lambda o: _rank(o, OP_ORDER)):
        out += [f"## {op}", "",
                "| impl | shape | dtype | mode | ms | metric | % ceil | x eager | peak MiB | note |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for r in (r for r in rows if r["op"] == op):
            metric = f"{r['metric']:.4g} {r['unit']}" if r["metric"] is not None else ""
            if r["status"] != "ok":
                note = r["note"]
            else:  # an ok row's note only describes the implementation: show what bears on its number
                note = "; ".join(filter(None, ["host timer" if r.get("timer") == "host" else "",
                                               *(part for part in r["note"].split("; ") if part.startswith(HOST_BOUND))]))
            note = note.replace("|", "/")[:140]
            out.append(f"| {r['impl']} | {r['shape']} | {r['dtype']} | {r['mode']} | {_ms(r)} | {metric} | "
                       f"{_num(r['pct_of_ceiling'], '.1f')} | {_num(r['speedup_vs_eager'], '.2f')} | "
                       f"{_num(r['peak_mib'], '.0f')} | {note} |")
        out.append("")
    return "\n".join(out)


def summary_markdown(data: dict) -> str:
    """The key shapes (tier 1): one line per (op, shape, dtype, mode), one column per implementation,
    each cell "ms (x eager)"; the last column is fastbert triton's % of the measured ceiling."""
    rows = [r for r in data["rows"] if r.get("tier") == 1]
    impls = sorted({r["impl"] for r in rows}, key=lambda i: _rank(i, IMPL_ORDER))
    groups = group_by_case(_sorted_rows(rows))
    out = [header(data), "",
           "| op | shape | dtype | mode | " + " | ".join(impls) + " | triton % ceil |",
           "|---|---|---|---|" + "---|" * len(impls) + "---|"]
    for (op, shape, dtype, mode), by_impl in groups.items():
        cells = timing_cells(by_impl, impls, baseline="eager")
        t = by_impl.get("triton")
        pct = f"{t['pct_of_ceiling']:.0f}% of {'copy' if t['unit'] == 'GB/s' else 'matmul'}" \
            if t and t.get("pct_of_ceiling") is not None else ""
        out.append(f"| {op} | {shape} | {dtype} | {mode} | " + " | ".join(cells) + f" | {pct} |")
    return "\n".join(out)


# issue 6's targets on an H100: (what, rows it applies to, value of a row, target, unit)
def _x(key):
    return lambda r: (r.get("speedup_vs") or {}).get(key)


MEMORY_BOUND = ("add_layernorm", "add_layernorm_amp", "layernorm_gelu", "bias_gelu")
KERNEL_TARGETS = [
    ("attention fwd+bwd vs SDPA's best backend", lambda r: r["op"] == "attention" and r["mode"] == "fwd+bwd",
     _x("sdpa_best"), 1.1, "x"),
    ("memory-bound op, % of measured copy bandwidth", lambda r: r["op"] in MEMORY_BOUND,
     lambda r: r.get("pct_of_ceiling"), 85.0, "%"),
    ("memory-bound op vs eager", lambda r: r["op"] in MEMORY_BOUND, lambda r: r.get("speedup_vs_eager"), 3.0, "x"),
    ("span score vs eager outer-sum", lambda r: r["op"] == "span_score", _x("outer_sum"), 20.0, "x"),
    ("span score vs Python n-best", lambda r: r["op"] == "span_score", _x("python_nbest"), 100.0, "x"),
]
E2E_TARGET_CASE = ("base-cls", "B8 S512", "train")
E2E_TARGETS = [
    ("BERT-base fine-tuning step, S512, vs transformers eager", lambda r: r.get("speedup_vs_eager"), 1.6, "x"),
    ("BERT-base fine-tuning step, S512, vs transformers + torch.compile",
     lambda r: r.get("speedup_vs_hf_compile"), 1.15, "x"),
    ("BERT-base fine-tuning step, S512, MFU (of the measured bf16 matmul rate)", lambda r: r.get("mfu_pct"), 55.0, "%"),
]


def targets_markdown(kernels: dict | None, e2e: dict | None) -> str:
    """Where each of issue 6's targets stands: one line per target, case and fastbert implementation
    (the key shapes: tier 1), measured value against the target, met or not."""
    lines = ["| target | case | impl | measured | target | met |", "|---|---|---|---|---|---|"]

    def line(what, case, impl, value, target, unit):
        shown = f"{value:.3g}{'x' if unit == 'x' else '%'}"
        lines.append(f"| {what} | {case} | {impl} | {shown} | >= {target:g}{'x' if unit == 'x' else '%'} | "
                     f"{'yes' if value >= target else '**no**'} |")

    for r in _sorted_rows((kernels or {}).get("rows", [])):
        if r.get("tier") != 1 or r["impl"] not in ("triton", "cuda") or r["status"] != "ok":
            continue
        for what, applies, value_of, target, unit in KERNEL_TARGETS:
            value = value_of(r) if applies(r) else None
            if value is not None:
                line(what, f"{r['op']} {r['shape']} {r['dtype']} {r['mode']}", r["impl"], value, target, unit)
    for r in (e2e or {}).get("rows", []):
        if (r["op"], r["shape"], r["mode"]) != E2E_TARGET_CASE or not r["impl"].startswith("fb_") \
                or r["status"] != "ok":
            continue
        for what, value_of, target, unit in E2E_TARGETS:
            value = value_of(r)
            if value is not None:
                line(what, f"{r['op']} {r['shape']} {r['mode']} {r['dtype']}", r["impl"], value, target, unit)
    return "\n".join(lines) if len(lines) > 2 else "No measured row meets a target's conditions yet."


# ----------------------------------------------------------------------------- kernel figure

@dataclasses.dataclass
class Series:
    """One implementation's points on a panel of the kernel figure (one variant: attention's mask kind).
    Line panels: xs are the x values (seqlen, rows, L) where the implementation has a measured row,
    ascending; bar panels: xs are the panel's category labels. speedup / pct: per x, speed-up over eager
    and % of the measured ceiling (None where that number is missing: no eager in the group)."""

    impl: str
    variant: str | None
    xs: list
    speedup: list
    pct: list


@dataclasses.dataclass
class Panel:
    """One column of the kernel figure: speed-up over eager against x (kind "line"), or grouped bars over
    the shapes of an op whose x has a single value (kind "bar"), with % of the ceiling below it."""

    op: str
    kind: str                      # "line" | "bar"
    title: str
    xlabel: str
    dtype: str
    mode: str
    unit: str                      # GB/s or TFLOP/s: which ceiling the % panel compares with
    series: list                   # [Series], IMPL_ORDER then variant order
    variants: dict                 # variant -> legend text (line styles), {} when the op has none
    categories: list = dataclasses.field(default_factory=list)   # bar panels: the x tick labels, in order


VARIANT_ORDER = ["none", "pad"]
LINE_STYLES = ["-", "--", ":", "-."]
MARKERS = ["o", "s", "^", "D"]


def _axis(r: dict) -> tuple:
    """Where a kernel row goes on the figure: (x, x symbol, axis label, panel key, variant).
    Lines connect rows of one panel key and variant only: attention (seqlen S) per model, H, D and mask
    kind; the LayerNorm family (rows N, or B x S where the shape records them) per width; the span
    score (window length L, its seqlen) per set (name and batch). x is None where the row has no such
    dimension (an op this table does not know: it gets a bar of its own)."""
    op, d, shape = r["op"], r.get("dims") or {}, str(r.get("shape", ""))
    first = shape.split()[0] if shape.split() else shape
    if op == "attention" or {"S", "H", "D"} <= d.keys():
        mask = d.get("mask") or ("none" if "nomask" in shape else "pad")
        return (d.get("S"), "S", "seqlen S", f"{d.get('model') or first} H{d.get('H')} D{d.get('D')}", mask)
    if "width" in d:
        rows = d["B"] * d["S"] if "B" in d and "S" in d else d.get("N")
        return (rows, "N", "rows N (tokens = batch x seqlen)",
                f"{'F' if op == 'bias_gelu' else 'H'}{d['width']}", None)
    if "L" in d:
        return (d["L"], "L", "window length L (the span score's seqlen)", f"{first} B{d.get('B')}", None)
    return (d.get("S"), "S", "seqlen S", shape, None)


def _variant_text(variant, rows) -> str:
    if variant is None:
        return ""
    if variant == "none":
        return "no mask"
    if variant == "pad":
        dims = [r.get("dims") or {} for r in rows]
        sources = sorted({(d.get("S") or 0, d["lengths"]) for d in dims if d.get("lengths")})
        where = ", ".join(f"{src} at S{s}" for s, src in sources)
        return "padding mask" + (f" (lengths: {where})" if where else "")
    return str(variant)


def _short_variant(variant) -> str:
    return {"none": "nomask", "pad": "pad"}.get(variant, str(variant)) if variant is not None else ""


def _ok_rows(data: dict) -> list:
    return [r for r in data.get("rows", []) if r.get("status") == "ok"]


def _choice(rows: list) -> tuple[str, str]:
    """The first dtype measured (row order) and fwd+bwd within it, else fwd, else the first mode."""
    dtype = rows[0]["dtype"]
    modes = [r["mode"] for r in rows if r["dtype"] == dtype]
    mode = "fwd+bwd" if "fwd+bwd" in modes else "fwd" if "fwd" in modes else modes[0]
    return dtype, mode


def kernel_panels(data: dict) -> list[Panel]:
    """What the kernel figure draws, as data: per op (first dtype measured, fwd+bwd or fwd), one line
    panel per panel key (see _axis) with two x values or more, and one bar panel for the panel keys of
    the op with a single x value. Only rows with status "ok" count; missing, skipped and failed rows
    leave holes (a point or a bar fewer), never an error."""
    ok = _ok_rows(data)
    panels = []
    for op in sorted({r["op"] for r in ok}, key=lambda o: (_rank(o, OP_ORDER), o)):
        mine = [r for r in ok if r["op"] == op]
        dtype, mode = _choice(mine)
        mine = _sorted_rows([r for r in mine if r["dtype"] == dtype and r["mode"] == mode])
        unit = mine[0].get("unit", "")
        groups: dict = {}            # panel key -> [(x, variant, row)]
        axis = {}
        for r in mine:
            x, sym, xlabel, key, variant = _axis(r)
            axis.setdefault(key, (sym, xlabel))
            groups.setdefault(key, []).append((x, variant, r))
        bars = []                    # (category, impl, row)
        for key, members in groups.items():
            sym, xlabel = axis[key]
            xs = sorted({x for x, _, _ in members if x is not None})
            if len(xs) < 2 or any(x is None for x, _, _ in members):
                for x, variant, r in members:
                    tag = f" {_short_variant(variant)}" if variant is not None else ""
                    bars.append((r["shape"] if x is None else f"{key}{tag} {sym}={x}", r["impl"], r))
                continue
            variants = sorted({v for _, v, _ in members}, key=lambda v: (_rank(v, VARIANT_ORDER), str(v)))
            series = []
            for impl in sorted({r["impl"] for _, _, r in members}, key=lambda i: (_rank(i, IMPL_ORDER), i)):
                for variant in variants:
                    points = {}
                    for x, v, r in members:
                        if r["impl"] == impl and v == variant:
                            points.setdefault(x, r)   # the first row of a duplicate x
                    if points:
                        px = sorted(points)
                        series.append(Series(impl, variant, px, [points[x].get("speedup_vs_eager") for x in px],
                                             [points[x].get("pct_of_ceiling") for x in px]))
            texts = {v: _variant_text(v, [r for _, w, r in members if w == v]) for v in variants if v is not None}
            panels.append(Panel(op, "line", f"{op}: {key} ({dtype}, {mode})", xlabel, dtype, mode, unit,
                                series, texts))
        if bars:
            categories = list(dict.fromkeys(c for c, _, _ in bars))
            series = []
            for impl in sorted({i for _, i, _ in bars}, key=lambda i: (_rank(i, IMPL_ORDER), i)):
                got = {}
                for c, i, r in bars:
                    if i == impl:
                        got.setdefault(c, r)
                cats = [c for c in categories if c in got]
                series.append(Series(impl, None, cats, [got[c].get("speedup_vs_eager") for c in cats],
                                     [got[c].get("pct_of_ceiling") for c in cats]))
            syms = list(dict.fromkeys(axis[k][1] for k in groups
                                      if len({x for x, _, _ in groups[k] if x is not None}) < 2
                                      or any(x is None for x, _, _ in groups[k])))
            xlabel = "shapes with a single value of " + " / ".join(syms) + ": bars, no line"
            panels.append(Panel(op, "bar", f"{op} ({dtype}, {mode})", xlabel, dtype, mode, unit, series, {},
                                categories))
    return panels


def impl_colors(impls) -> dict:
    """A fixed colour per implementation (IMPL_ORDER first, then any other name alphabetically), so one
    implementation has one colour in every panel and every run."""
    from matplotlib import colormaps

    palette = [colormaps["tab10"](i) for i in range(10)] + [colormaps["tab20"](2 * i + 1) for i in range(10)]
    names = IMPL_ORDER + sorted(set(impls) - set(IMPL_ORDER))
    return {impl: palette[n % len(palette)] for n, impl in enumerate(names)}


def _ceiling_label(unit: str) -> str:
    return "MFU: % of measured bf16 matmul" if unit == "TFLOP/s" else "% of measured copy bandwidth" \
        if unit == "GB/s" else "% of measured ceiling"


def _draw_line_panel(ax_up, ax_pct, panel: Panel, colors: dict) -> None:
    from matplotlib.lines import Line2D

    variants = [v for v in dict.fromkeys(s.variant for s in panel.series)]
    style = {v: (LINE_STYLES[n % len(LINE_STYLES)], MARKERS[n % len(MARKERS)]) for n, v in enumerate(variants)}
    xs_all = sorted({x for s in panel.series for x in s.xs})
    for s in panel.series:
        ls, marker = style[s.variant]
        for ax, values, what in ((ax_up, s.speedup, "speedup"), (ax_pct, s.pct, "pct")):
            if what == "speedup" and s.impl == "eager":
                continue  # eager is the line at 1x
            pts = [(x, y) for x, y in zip(s.xs, values) if y is not None and (what == "pct" or y > 0)]
            if pts:
                ax.plot([x for x, _ in pts], [y for _, y in pts], linestyle=ls, marker=marker, markersize=5,
                        color=colors[s.impl], gid=f"{panel.title}|{what}|{s.impl}|{s.variant}")
    for ax in (ax_up, ax_pct):
        if xs_all and xs_all[0] > 0 and xs_all[-1] / xs_all[0] >= 16:
            ax.set_xscale("log", base=2)
        ax.set_xticks(xs_all)
        ax.set_xticklabels([f"{x:g}" for x in xs_all], fontsize=8)
        ax.minorticks_off()
        ax.set_xlabel(panel.xlabel)
        ax.grid(alpha=0.3)
    _finish_speedup_axis(ax_up, panel, colors)
    handles = [Line2D([], [], color=colors[i], marker="o", label=i)
               for i in dict.fromkeys(s.impl for s in panel.series) if i != "eager"]
    handles.insert(0, Line2D([], [], color=colors.get("eager", "black"), linewidth=1.2, label="eager (= 1x)"))
    if panel.variants:
        handles += [Line2D([], [], color="black", linestyle=style[v][0], marker=style[v][1], label=text)
                    for v, text in panel.variants.items() if v in style]
    ax_up.legend(handles=handles, fontsize=7)
    ax_pct.set_ylabel(_ceiling_label(panel.unit))


def _draw_bar_panel(ax_up, ax_pct, panel: Panel, colors: dict) -> None:
    cats = panel.categories
    for ax, what in ((ax_up, "speedup"), (ax_pct, "pct")):
        shown = [s for s in panel.series if not (what == "speedup" and s.impl == "eager")]
        width = 0.8 / max(len(shown), 1)
        for n, s in enumerate(shown):
            values = s.speedup if what == "speedup" else s.pct
            pts = [(cats.index(c), v) for c, v in zip(s.xs, values) if v is not None and (what == "pct" or v > 0)]
            if not pts:
                continue
            xs = [c + (n - (len(shown) - 1) / 2) * width for c, _ in pts]
            if what == "speedup":  # bars grow from the 1x line, up (faster) or down (slower)
                ax.bar(xs, [v - 1.0 for _, v in pts], width, bottom=1.0, color=colors[s.impl], label=s.impl,
                       gid=f"{panel.title}|{what}|{s.impl}|None")
            else:
                ax.bar(xs, [v for _, v in pts], width, color=colors[s.impl], label=s.impl,
                       gid=f"{panel.title}|{what}|{s.impl}|None")
        ax.set_xticks(range(len(cats)))
        ax.set_xticklabels(cats, rotation=30, ha="right", fontsize=7)
        ax.set_xlabel(panel.xlabel, fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    _finish_speedup_axis(ax_up, panel, colors)
    ax_up.legend(fontsize=7)
    ax_pct.set_ylabel(_ceiling_label(panel.unit))


def _finish_speedup_axis(ax, panel: Panel, colors: dict) -> None:
    """Log scale, the eager line at 1x, ticks written "2x" (and at 2, 3, 5 between powers of ten when
    the panel spans less than two decades)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_yscale("log")
    ax.axhline(1.0, color=colors.get("eager", "black"), linewidth=1.2, label="eager (= 1x)")
    times = FuncFormatter(lambda v, _: f"{v:g}x")
    ax.yaxis.set_major_formatter(times)
    low, high = ax.get_ylim()
    if high / low < 100:
        ax.yaxis.set_minor_locator(LogLocator(base=10, subs=(2.0, 3.0, 5.0)))
        ax.yaxis.set_minor_formatter(times)
    else:
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_ylabel("speed-up over eager (log)")
    ax.set_title(panel.title, fontsize=10)


def draw_kernels(data: dict):
    """(figure, panels): the kernel figure, a column per panel (kernel_panels), speed-up over eager
    on top, % of the measured ceiling below, up to 4 columns a row; (None, []) with no measured row.
    Every drawn line or bar set carries the gid "<panel title>|speedup|<impl>|<variant>" (or
    "|pct|"): tests read back what was drawn."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = kernel_panels(data)
    if not panels:
        return None, panels
    ncols = min(4, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(2 * nrows, ncols, figsize=(5.8 * ncols, 9.0 * nrows), squeeze=False)
    colors = impl_colors({s.impl for p in panels for s in p.series})
    for n, panel in enumerate(panels):
        row, col = 2 * (n // ncols), n % ncols
        draw = _draw_line_panel if panel.kind == "line" else _draw_bar_panel
        draw(axes[row][col], axes[row + 1][col], panel, colors)
    for n in range(len(panels), nrows * ncols):
        axes[2 * (n // ncols)][n % ncols].axis("off")
        axes[2 * (n // ncols) + 1][n % ncols].axis("off")
    return fig, panels


def plot(data: dict, png: Path) -> Path | None:
    """The kernel figure (draw_kernels): per op, speed-up over eager against seqlen (log scale, a line at
    1x, one line per implementation; rows N for the LayerNorm family, L for the span score; bars where a
    shape has a single such value) above % of the measured ceiling, for the first dtype measured and the
    fwd+bwd mode (fwd for ops without a backward)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("report: matplotlib is not installed; no plot", file=sys.stderr)
        return None
    fig, _ = draw_kernels(data)
    if fig is None:
        return None
    return save_figure(fig, plt, data.get("env", {}), "kernels", png)


def bar_panel(ax, categories, impls, values_of, ylabel, title=None, rotation=60):
    """Grouped bars, one group per category and one bar per implementation; with a title the
    panel is a speed-up panel: log scale and a line at 1x."""
    width = 0.8 / max(len(impls), 1)
    for i, impl in enumerate(impls):
        values = values_of(impl)
        xs = [c + (i - (len(impls) - 1) / 2) * width for c in range(len(categories))]
        ax.bar(xs, [values.get(c) or 0.0 for c in categories], width, label=impl)
    ax.set_xticks(range(len(categories)))
    ax.set_xticklabels(categories, rotation=rotation, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
    if title is not None:
        ax.set_yscale("log")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)


def save_figure(fig, plt, env: dict, what: str, png) -> Path:
    """Title the figure with the run's device, versions and commit, and write it."""
    fig.suptitle(f"fastbert {what} on {env.get('gpu')} (torch {env.get('torch')}, triton {env.get('triton')}, "
                 f"commit {str(env.get('commit'))[:12]})")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / fig.get_figheight()))  # room for the title
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=90)
    plt.close(fig)
    return png


def _shown(path: Path):
    try:
        return Path(path).resolve().relative_to(REPO)
    except ValueError:
        return Path(path)


def e2e_beside(source: Path, root: Path = RESULTS) -> Path | None:
    """The e2e.json of the run of `source` (same folder), else the newest under root, else None."""
    beside = Path(source).parent / "e2e.json"
    if beside.is_file():
        return beside
    try:
        return latest_results(root, "e2e.json")
    except FileNotFoundError:
        return None


def readme_block(data: dict, source: Path, e2e_path: Path | None = None) -> str:
    """The README's performance text: kernels summary, e2e summary (when given), targets."""
    from . import bench_e2e

    e2e = load(e2e_path) if e2e_path else None
    parts = ["### Kernels", "", summary_markdown(data), "",
             legend("eager PyTorch (fastbert's plain-PyTorch reference of the op, `fastbert.ops.*_ref`); GPU time "
                    "from CUDA events"),
             "", f"Full table: `{_shown(source).with_suffix('.md')}`."]
    if e2e is not None:
        parts += ["", "### End to end", "", bench_e2e.summary_markdown(e2e), "",
                  legend("transformers with eager attention (hf_eager); steps timed back to back as a "
                         "training loop runs them") + " MFU: model FLOPs per second over the bf16 matmul "
                  "rate measured in the same run, not the GPU's datasheet peak.",
                  "", f"Full table: `{_shown(e2e_path).with_suffix('.md')}`."]
    against = "this run"
    if e2e is not None and Path(e2e_path).resolve().parent != Path(source).resolve().parent:
        # e2e_beside fell back to another run's e2e.json: say which numbers come from where
        def run(path, env):
            return f"`{_shown(path).parent}` ({env.get('gpu')}, commit `{env.get('commit')}`)"
        against = (f"two runs: kernels from {run(source, data.get('env', {}))}, end to end from "
                   f"{run(e2e_path, e2e.get('env', {}))}")
    parts += ["", f"### Issue 6's targets (set for an H100) against {against}", "", targets_markdown(data, e2e)]
    return "\n".join(parts)


def update_readme(readme: Path, data: dict, source: Path, e2e_path: Path | None = None) -> None:
    """Replace the block between the markers in `readme` with the summary tables."""
    text = Path(readme).read_text()
    if START not in text or END not in text:
        raise ValueError(f"{readme}: add the markers {START} and {END} where the table goes")
    block = f"{START}\n{readme_block(data, source, e2e_path)}\n{END}"
    Path(readme).write_text(re.sub(re.escape(START) + ".*?" + re.escape(END), lambda m: block, text, flags=re.S))


def write_all(data: dict, out_dir: Path, stem: str = "kernels") -> tuple[Path, Path | None]:
    """Markdown table and plot of a results JSON (a kernels run or, by its meta, an e2e run)."""
    if is_e2e(data):
        from . import bench_e2e

        return bench_e2e.write_all(data, out_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / f"{stem}.md"
    md.write_text(markdown(data) + "\n")
    return md, plot(data, out_dir / f"{stem}.png")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="?", type=Path, help="results JSON (default: the newest under benchmarks/results)")
    parser.add_argument("--out", type=Path, help="write kernels.md and kernels.png here")
    parser.add_argument("--readme", type=Path, help="replace the marked performance block of this README")
    parser.add_argument("--summary", action="store_true", help="print the key-shape summary table")
    args = parser.parse_args(argv)
    from . import bench_e2e

    try:
        path = args.results or latest_results()
        data = load(path)
        if args.out:
            md, png = write_all(data, args.out, stem=path.stem)
            print(f"wrote {md}" + (f" and {png}" if png else ""))
        if not (args.readme or args.summary):
            if not args.out:
                print(bench_e2e.summary_markdown(data) if is_e2e(data) else summary_markdown(data))
            return 0
        # The README block starts from a kernels run, with the e2e run beside it (or the newest).
        if is_e2e(data) and not args.readme and not (path.parent / "kernels.json").is_file():
            # An e2e run on its own (gpu_check.sh's second call: $OUT holds no kernels.json): its own
            # summary and targets, not another run's kernels table (nor an error where there is none).
            print(bench_e2e.summary_markdown(data))
            print("\nissue 6's targets:\n" + targets_markdown(None, data))
            return 0
        if is_e2e(data):
            e2e_path = path
            path = path.parent / "kernels.json" if (path.parent / "kernels.json").is_file() else latest_results()
            data = load(path)
        else:
            e2e_path = e2e_beside(path)
    except (FileNotFoundError, json.JSONDecodeError) as err:
        print(f"report: error: {err}", file=sys.stderr)
        return 2
    if args.readme:
        update_readme(args.readme, data, path, e2e_path)
        print(f"updated {args.readme} from {path}" + (f" and {e2e_path}" if e2e_path else ""))
    if args.summary:
        print(readme_block(data, path, e2e_path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
