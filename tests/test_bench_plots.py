"""The kernel figure of benchmarks/report.py on synthetic results (CPU, seconds, no suite run): which
panels, lines, x values and y values it draws (speed-up over eager against seqlen per op, % of the
measured ceiling below), from rows in the harness's format with holes (skipped, failed and missing
rows), and the PNG it writes. Pixels are not compared; the drawn data is."""
import pytest

from benchmarks import harness, report

CEILINGS = {"copy_GBps": 1000.0, "matmul_TFLOPs": 100.0, "copy_bytes": 1, "matmul_shape": "8192^3 bf16"}
ENV = {"gpu": "synthetic", "torch": "x", "triton": "y", "commit": "0123456789abcdef"}


def row(op, impl, shape, dims, ms, dtype="bfloat16", mode="fwd+bwd", status="ok", unit=harness.TFLOPS, work=1e9):
    """One row as harness.run_case writes it (ms None unless status is "ok")."""
    ok = status == "ok"
    return {"op": op, "impl": impl, "shape": shape, "dims": dims, "dtype": dtype, "mode": mode, "status": status,
            "note": "" if ok else f"{status} on purpose", "unit": unit, "work": work, "tier": 1,
            "ms": ms if ok else None, "ms_p20": ms if ok else None, "ms_p80": ms if ok else None,
            "reps": 1 if ok else None, "host_us": None, "first_call_s": 0.1 if ok else None,
            "metric": (work / (ms * 1e6) if unit == harness.GBPS else work / (ms * 1e9)) if ok else None,
            "pct_of_ceiling": None, "speedup_vs_eager": None, "peak_mib": None, "utc": "2026-01-01T00:00:00Z"}


def attention(model, B, S, H, D, masked, impl, ms, **kw):
    source = {128: "sst2", 384: "squad"}.get(S, "unif")
    dims = {"B": B, "S": S, "H": H, "D": D, "mask": "pad" if masked else "none",
            "lengths": source if masked else None, "real_fraction": 0.5 if masked else 1.0}
    label = f"{model} B{B} S{S} H{H} D{D} {'pad-' + source if masked else 'nomask'}"
    return row("attention", impl, label, dims, ms, **kw)


# eager ms at each S; each implementation is this many times faster (ms = eager / speed-up)
SPEEDUP = {"triton": 2.0, "compile": 1.5, "sdpa_efficient": 1.25, "sdpa_flash": 1.6, "sdpa_math": 0.5}


def eager_ms(model, S, masked):
    return S / 64 * (2.0 if model == "large" else 1.0) * (0.8 if masked else 1.0)


def synthetic_run() -> dict:
    rows = []
    for dtype in ("bfloat16", "float16"):                        # float16 is the second dtype: not drawn
        for model, shapes in (("base", [(64, 128), (32, 384), (16, 512)]),
                              ("large", [(64, 128), (16, 512)]),   # S384 missing: the run was cut short
                              ("minilm", [(16, 512)])):             # one seqlen: a bar
            H, D = (16, 64) if model == "large" else (12, 32) if model == "minilm" else (12, 64)
            for B, S in shapes:
                for masked in (False, True):
                    for mode in ("fwd", "fwd+bwd"):
                        base = eager_ms(model, S, masked) * (1 if dtype == "bfloat16" else 3)
                        rows.append(attention(model, B, S, H, D, masked, "eager", base, dtype=dtype, mode=mode))
                        rows.append(attention(model, B, S, H, D, masked, "cuda", None, dtype=dtype, mode=mode,
                                              status="skipped"))
                        for impl, x in SPEEDUP.items():
                            status = "ok"
                            if impl == "sdpa_flash" and masked:
                                status = "unsupported"
                            if impl == "compile" and model == "base" and S == 384:
                                status = "error"
                            rows.append(attention(model, B, S, H, D, masked, impl, base / x, dtype=dtype,
                                                  mode=mode, status=status))
    # LayerNorm family: add_layernorm with a single N (bars, one per width); layernorm_gelu recording B and
    # S (rows = B x S, a line per width); bias_gelu whose eager failed at one N (no speed-up there).
    for width in (384, 768):
        for impl, ms in (("eager", 3.0), ("triton", 1.0), ("compile", 1.5)):
            rows.append(row("add_layernorm", impl, f"N16384 H{width}", {"N": 16384, "width": width}, ms,
                            unit=harness.GBPS))
    for B, S in ((32, 128), (32, 512)):
        for impl, ms in (("eager", 4.0 * S / 128), ("triton", S / 128)):
            rows.append(row("layernorm_gelu", impl, f"N{B * S} H768", {"N": B * S, "width": 768, "B": B, "S": S},
                            ms, unit=harness.GBPS))
        rows.append(row("layernorm_gelu", "triton", f"N{B * S} H768", {"N": B * S, "width": 768, "B": B, "S": S},
                        S / 256, mode="fwd", unit=harness.GBPS))    # fwd rows exist too: fwd+bwd is drawn
    for n in (4096, 16384):
        rows.append(row("bias_gelu", "eager", f"N{n} F3072", {"N": n, "width": 3072}, 2.0,
                        unit=harness.GBPS, status="error" if n == 4096 else "ok"))
        rows.append(row("bias_gelu", "triton", f"N{n} F3072", {"N": n, "width": 3072}, 0.5, unit=harness.GBPS))
    # span score: forward only, float32 first; two window lengths of one set, python_nbest skipped at one.
    for L in (128, 384):
        dims = {"B": 32, "L": L, "topk": 20, "max_answer_len": 30}
        for impl, ms in (("eager", 1.0), ("triton", 0.1), ("outer_sum", 2.0), ("python_nbest", 50.0)):
            skipped = impl == "python_nbest" and L == 128
            rows.append(row("span_score", impl, f"batch B32 L{L} k20", dims, ms, dtype="float32", mode="fwd",
                            unit=harness.GBPS, status="skipped" if skipped else "ok"))
        rows.append(row("span_score", "triton", f"batch B32 L{L} k20", dims, 0.05, dtype="bfloat16", mode="fwd",
                        unit=harness.GBPS))
    harness.add_derived(rows, CEILINGS)
    return {"env": ENV, "meta": {"suite": "kernels"}, "ceilings": CEILINGS, "rows": rows}


def by_title(panels):
    return {p.title: p for p in panels}


def series(panel, impl, variant=None):
    found = [s for s in panel.series if s.impl == impl and s.variant == variant]
    assert len(found) <= 1
    return found[0] if found else None


def drawn(fig):
    """gid -> (xs, ys) of every line and bar set drawn, bars by the positions of their categories."""
    out = {}
    for ax in fig.axes:
        for line in ax.get_lines():
            if line.get_gid():
                out[line.get_gid()] = (list(line.get_xdata()), list(line.get_ydata()))
        for container in ax.containers:
            patches = list(container)
            if patches and patches[0].get_gid():
                out[patches[0].get_gid()] = (
                    [p.get_x() + p.get_width() / 2 for p in patches], [p.get_y() + p.get_height() for p in patches])
    return out


def test_kernel_panels_speedup_against_seqlen():
    data = synthetic_run()
    panels = report.kernel_panels(data)
    titles = [p.title for p in panels]
    assert titles == ["attention: base H12 D64 (bfloat16, fwd+bwd)", "attention: large H16 D64 (bfloat16, fwd+bwd)",
                      "attention (bfloat16, fwd+bwd)", "add_layernorm (bfloat16, fwd+bwd)",
                      "layernorm_gelu: H768 (bfloat16, fwd+bwd)", "bias_gelu: F3072 (bfloat16, fwd+bwd)",
                      "span_score: batch B32 (float32, fwd)"]
    p = by_title(panels)
    base = p["attention: base H12 D64 (bfloat16, fwd+bwd)"]
    assert base.kind == "line" and base.xlabel == "seqlen S" and base.unit == "TFLOP/s"
    assert base.variants == {"none": "no mask",
                             "pad": "padding mask (lengths: sst2 at S128, squad at S384, unif at S512)"}
    # one line per implementation and mask kind; cuda (skipped) draws nothing; flash has no masked line
    assert [(s.impl, s.variant) for s in base.series] == [
        ("triton", "none"), ("triton", "pad"), ("eager", "none"), ("eager", "pad"), ("compile", "none"),
        ("compile", "pad"), ("sdpa_flash", "none"), ("sdpa_efficient", "none"), ("sdpa_efficient", "pad"),
        ("sdpa_math", "none"), ("sdpa_math", "pad")]
    for impl, x in SPEEDUP.items():
        for variant in ("none", "pad"):
            s = series(base, impl, variant)
            if impl == "sdpa_flash" and variant == "pad":
                assert s is None
                continue
            xs = [128, 512] if impl == "compile" else [128, 384, 512]   # compile failed at S384
            assert s.xs == xs
            assert s.speedup == pytest.approx([x] * len(xs))
            masked = variant == "pad"
            # % of the matmul ceiling: work / ms against 100 TFLOP/s
            assert s.pct == pytest.approx([100.0 * 1e9 / (eager_ms("base", S, masked) / x * 1e9) / 100.0
                                           for S in xs])
    assert series(base, "eager", "none").speedup == [1.0, 1.0, 1.0]
    large = p["attention: large H16 D64 (bfloat16, fwd+bwd)"]
    assert series(large, "triton", "none").xs == [128, 512]             # the missing S384 is a hole
    single = p["attention (bfloat16, fwd+bwd)"]
    assert single.kind == "bar" and single.xlabel == "shapes with a single value of seqlen S: bars, no line"
    assert single.categories == ["minilm H12 D32 nomask S=512", "minilm H12 D32 pad S=512"]
    assert series(single, "triton").xs == single.categories and series(single, "triton").speedup == [2.0, 2.0]
    assert series(single, "sdpa_flash").xs == ["minilm H12 D32 nomask S=512"]

    ln = p["add_layernorm (bfloat16, fwd+bwd)"]
    assert ln.kind == "bar" and "rows N" in ln.xlabel and ln.unit == "GB/s"
    assert ln.categories == ["H384 N=16384", "H768 N=16384"]
    assert series(ln, "triton").speedup == [3.0, 3.0] and series(ln, "compile").speedup == [2.0, 2.0]
    gelu = p["layernorm_gelu: H768 (bfloat16, fwd+bwd)"]
    assert gelu.kind == "line" and gelu.xlabel.startswith("rows N")
    assert series(gelu, "triton").xs == [32 * 128, 32 * 512] and series(gelu, "triton").speedup == [4.0, 4.0]
    bias = p["bias_gelu: F3072 (bfloat16, fwd+bwd)"]
    t = series(bias, "triton")
    assert t.xs == [4096, 16384] and t.speedup == [None, 4.0] and all(v is not None for v in t.pct)

    span = p["span_score: batch B32 (float32, fwd)"]
    assert span.kind == "line" and span.xlabel.startswith("window length L") and span.dtype == "float32"
    assert series(span, "triton").speedup == pytest.approx([10.0, 10.0])
    assert series(span, "outer_sum").speedup == pytest.approx([0.5, 0.5])
    assert series(span, "python_nbest").xs == [384]                       # skipped at L128


def test_kernel_figure_draws_the_panels_and_writes_a_png(tmp_path):
    data = synthetic_run()
    fig, panels = report.draw_kernels(data)
    got = drawn(fig)
    import matplotlib.pyplot as plt

    plt.close(fig)
    base = panels[0]
    t = base.title + "|"
    s = series(base, "compile", "pad")
    assert got[t + "speedup|compile|pad"] == ([128, 512], pytest.approx([1.5, 1.5]))
    assert got[t + "pct|compile|pad"] == (s.xs, pytest.approx(s.pct))
    assert t + "speedup|eager|none" not in got and t + "pct|eager|none" in got   # eager is the 1x line on top
    # bias_gelu's triton line: no speed-up point where eager failed, both % points
    bias = [p for p in panels if p.op == "bias_gelu"][0].title + "|"
    assert got[bias + "speedup|triton|None"] == ([16384], [4.0])
    assert got[bias + "pct|triton|None"][0] == [4096, 16384]
    # what is drawn is exactly the panels' series (eager only in the % panel; a series without a value
    # for a row draws nothing there)
    expected = {f"{p.title}|{what}|{s.impl}|{s.variant}" for p in panels for s in p.series
                for what, values in (("speedup", s.speedup), ("pct", s.pct))
                if any(v is not None for v in values) and not (what == "speedup" and s.impl == "eager")}
    assert set(got) == expected
    for p in panels:
        for s in p.series:
            key = f"{p.title}|pct|{s.impl}|{s.variant}"
            if p.kind == "line" and key in got:
                assert got[key] == ([x for x, v in zip(s.xs, s.pct) if v is not None],
                                    pytest.approx([v for v in s.pct if v is not None]))
            if p.kind == "bar" and s.impl != "eager":
                assert got[f"{p.title}|speedup|{s.impl}|None"][1] == pytest.approx(s.speedup)

    png = report.plot(data, tmp_path / "kernels.png")
    assert png == tmp_path / "kernels.png"
    raw = png.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n" and len(raw) > 50_000
    from matplotlib.image import imread

    height, width = imread(png).shape[:2]
    assert width > 1500 and height > 1200                               # 4 columns, 2 rows of panel pairs
    # deterministic: the same data gives the same file
    assert report.plot(data, tmp_path / "again.png").read_bytes() == raw


def test_single_seqlen_per_op_gives_bar_panels(tmp_path):
    rows = []
    for masked in (False, True):
        for impl, ms in (("eager", 2.0), ("triton", 1.0), ("sdpa_math", 4.0)):
            rows.append(attention("tiny", 2, 32, 2, 32, masked, impl, ms))
    for impl, ms in (("eager", 2.0), ("triton", 0.5)):
        rows.append(row("bias_gelu", impl, "N64 F128", {"N": 64, "width": 128}, ms, unit=harness.GBPS))
        rows.append(row("span_score", impl, "tiny B8 L64 k20", {"B": 8, "L": 64, "topk": 20}, ms, mode="fwd",
                        dtype="float32", unit=harness.GBPS))
    rows.append(row("span_score", "python_nbest", "tiny B8 L64 k20", {"B": 8, "L": 64}, None, mode="fwd",
                    dtype="float32", unit=harness.GBPS, status="error"))
    harness.add_derived(rows, CEILINGS)
    data = {"env": ENV, "rows": rows}
    panels = report.kernel_panels(data)
    assert [(p.op, p.kind) for p in panels] == [("attention", "bar"), ("bias_gelu", "bar"), ("span_score", "bar")]
    att, bias, span = panels
    assert att.categories == ["tiny H2 D32 nomask S=32", "tiny H2 D32 pad S=32"]
    assert att.xlabel == "shapes with a single value of seqlen S: bars, no line"
    assert [s.impl for s in att.series] == ["triton", "eager", "sdpa_math"]
    assert series(att, "sdpa_math").speedup == [0.5, 0.5]
    assert bias.categories == ["F128 N=64"] and "N" in bias.xlabel
    assert span.categories == ["tiny B8 L=64"] and "L" in span.xlabel
    assert [s.impl for s in span.series] == ["triton", "eager"]          # the failed python_nbest is not drawn
    fig, _ = report.draw_kernels(data)
    got = drawn(fig)
    import matplotlib.pyplot as plt

    plt.close(fig)
    # bars grow from the 1x line: their tops are the speed-ups
    t = att.title + "|"
    assert got[t + "speedup|sdpa_math|None"][1] == pytest.approx([0.5, 0.5])
    assert got[t + "speedup|triton|None"][1] == pytest.approx([2.0, 2.0])
    assert got[span.title + "|speedup|triton|None"][1] == pytest.approx([4.0])
    png = report.plot(data, tmp_path / "k.png")
    assert png.stat().st_size > 20_000


def test_no_measured_row_draws_nothing(tmp_path):
    rows = [row("attention", "triton", "x", {"S": 128, "H": 1, "D": 1}, None, status="error"),
            row("bias_gelu", "cuda", "N1 F1", {"N": 1, "width": 1}, None, status="skipped", unit=harness.GBPS)]
    assert report.kernel_panels({"rows": rows}) == []
    assert report.plot({"env": ENV, "rows": rows}, tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()
