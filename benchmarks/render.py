"""Render every ``benchmarks/results/*.json`` into BENCHMARKS.md (between the results markers, prose
around them kept) and one speedup plot per results file (``speedup-<gpu>-<date>.png`` beside it).

    python -m benchmarks.render [--results-dir DIR] [--output BENCHMARKS.md]

Speedup = baseline median / diffaccel median (> 1: diffaccel is faster), both from the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Optional

from benchmarks.results import RESULTS_DIR, SCHEMA, ResultsError, case_key, is_baseline, is_ours, load

BEGIN = "<!-- results:begin -->"
END = "<!-- results:end -->"
EMPTY = "No GPU measurements recorded yet."
DEFAULT_OUTPUT = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"


def _fmt_ms(ms: Optional[float]) -> str:
    if ms is None:
        return "—"
    return f"{ms:.4f}" if ms < 0.1 else f"{ms:.3f}" if ms < 10 else f"{ms:.1f}"


def _fmt(x: Optional[float], digits: int = 1) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def comparison_rows(results: dict) -> "OrderedDict[str, list]":
    """{family: [{case, shape, dtype, impl, ms, tflops, gbps, baselines: {name: ms}, speedups: {name: x}}]}."""
    by_key: dict = {}
    for c in results["cases"]:
        by_key.setdefault(case_key(c), []).append(c)
    families: "OrderedDict[str, list]" = OrderedDict()
    for key in sorted(by_key):
        members = by_key[key]
        base = {c["impl"].split(":", 1)[1]: c["median_ms"] for c in members if is_baseline(c["impl"])}
        base_weights = {c["impl"].split(":", 1)[1]: c["weight_bytes"] for c in members
                        if is_baseline(c["impl"]) and c.get("weight_bytes")}
        for ours in sorted((c for c in members if is_ours(c["impl"])), key=lambda c: c["impl"]):
            families.setdefault(key[0], []).append({
                "case": key[1], "shape": key[2], "dtype": key[3], "impl": ours["impl"], "ms": ours["median_ms"],
                "tflops": ours.get("tflops"), "gbps": ours.get("gbps"), "baselines": base,
                "speedups": {b: ms / ours["median_ms"] for b, ms in base.items()},
                "weight_bytes": ours.get("weight_bytes"), "peak_memory_bytes": ours.get("peak_memory_bytes"),
                "base_weight_bytes": base_weights,
            })
    return families


def _heading(results: dict, source: str) -> list:
    dev = results["device"]
    commit = (results.get("commit") or "?")[:10] + (" (dirty tree)" if results.get("dirty") else "")
    driver = f", driver {dev['driver']}" if dev.get("driver") else ""
    return [f"### {dev['name']} (sm_{str(dev.get('capability', '?')).replace('.', '')}) — {results['date']}", "",
            f"torch {results.get('torch')}, Triton {results.get('triton')}, CUDA {results.get('cuda')}{driver}; "
            f"diffaccel {results.get('diffaccel')} at commit `{commit}`; data: `{source}`", ""]


def family_table(rows: list) -> list:
    baselines = sorted({b for r in rows for b in r["baselines"]})
    with_tflops = any(r["tflops"] is not None for r in rows)
    with_gbps = any(r["gbps"] is not None for r in rows)
    head = ["case", "shape", "dtype", "impl", "ours ms"]
    head += [f"{b} ms" for b in baselines] + [f"speedup vs {b}" for b in baselines]
    head += (["TFLOPS"] if with_tflops else []) + (["GB/s"] if with_gbps else [])
    # memory where the run measured it (e2e): the backbone's weights, their ratio to the first baseline's
    # (the targets: <= 0.55x with W8A8, <= 0.33x with W4A8), and the peak allocated
    with_weights = any(r.get("weight_bytes") for r in rows)
    weight_base = next((b for b in baselines if any(b in r.get("base_weight_bytes", {}) for r in rows)), None)
    with_peak = any(r.get("peak_memory_bytes") for r in rows)
    head += (["weights GiB"] if with_weights else []) + ([f"weights ÷ {weight_base}"] if with_weights and weight_base
                                                          else []) + (["peak GiB"] if with_peak else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["case"], r["shape"], r["dtype"], r["impl"], _fmt_ms(r["ms"])]
        cells += [_fmt_ms(r["baselines"].get(b)) for b in baselines]
        cells += [f"{r['speedups'][b]:.2f}×" if b in r["speedups"] else "—" for b in baselines]
        if with_tflops:
            cells.append(_fmt(r["tflops"]))
        if with_gbps:
            cells.append(_fmt(r["gbps"], 0))
        weights, base_weights = r.get("weight_bytes"), r.get("base_weight_bytes", {}).get(weight_base)
        if with_weights:
            cells.append(_fmt(weights / 2**30 if weights else None, 2))
        if with_weights and weight_base:
            cells.append(f"{weights / base_weights:.2f}×" if weights and base_weights else "—")
        if with_peak:
            peak = r.get("peak_memory_bytes")
            cells.append(_fmt(peak / 2**30 if peak else None, 2))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def speedup_plot(results: dict, png: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = []  # (label, baseline, speedup)
    for family, rows in comparison_rows(results).items():
        for r in rows:
            for b, s in sorted(r["speedups"].items()):
                bars.append((f"{family}/{r['case']} {r['shape']} {r['dtype']} {r['impl']}", b, s))
    baselines = sorted({b for _, b, _ in bars})
    labels = list(OrderedDict.fromkeys(label for label, _, _ in bars))
    height = 0.8 / max(len(baselines), 1)
    # one row per diffaccel case, its baselines side by side inside it (a row per baseline made the
    # first H200 run's plot 18,000 pixels tall)
    fig, ax = plt.subplots(figsize=(10, max(2.5, 0.3 * len(labels) + 1.5)))
    for i, b in enumerate(baselines):
        ys = [labels.index(label) + i * height for label, bb, _ in bars if bb == b]
        xs = [s for _, bb, s in bars if bb == b]
        ax.barh(ys, xs, height=height, label=f"vs {b}")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")  # speedups span 0.04x to 24x in one run
    ax.set_yticks([i + height * (len(baselines) - 1) / 2 for i in range(len(labels))])
    ax.set_yticklabels(labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("speedup (baseline time / diffaccel time; > 1 is faster)")
    ax.set_title(f"diffaccel on {results['device']['name']}, {results['date']} (torch {results.get('torch')})")
    if baselines:
        ax.legend(fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png


def render_section(results_dir: Path, output: Path, plots: bool = True) -> str:
    # speed results only (schema 1, as benchmarks/results.py and e2e.py write them); the quality
    # benchmark's files live beside them with their own table
    if not Path(results_dir).is_dir():  # (a mistyped --results-dir must not blank the committed tables)
        raise SystemExit(f"benchmarks.render: --results-dir {str(results_dir)!r} is not a directory")
    files = []
    for f in sorted(Path(results_dir).glob("*.json")):
        try:
            data = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise SystemExit(f"benchmarks.render: {f} is not valid JSON ({e}); a run killed mid-write leaves such "
                             f"a file: restore it from git or remove it") from None
        if isinstance(data, dict) and data.get("schema") == SCHEMA:
            files.append(f)
    if not files:
        return EMPTY
    out = []
    loaded = sorted(((load(f), f) for f in files), key=lambda rf: (rf[0]["date"], rf[0]["device"]["name"]),
                    reverse=True)
    for results, f in loaded:
        rel = os.path.relpath(f, output.parent)
        out += _heading(results, rel)
        if plots:
            png = speedup_plot(results, f.with_name(f"speedup-{f.stem}.png"))
            out += [f"![speedup on {results['device']['name']}]({os.path.relpath(png, output.parent)})", ""]
        for family, rows in comparison_rows(results).items():
            out += [f"#### {family}", ""] + family_table(rows) + [""]
    return "\n".join(out).rstrip()


def replace_between_markers(text: str, body: str, source: str = "BENCHMARKS.md") -> str:
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise ResultsError(f"{source}: expected exactly one {BEGIN} followed by one {END}")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{body}\n{END}{tail}"


def render(results_dir: Path = RESULTS_DIR, output: Path = DEFAULT_OUTPUT, plots: bool = True) -> str:
    output = Path(output)
    text = output.read_text() if output.exists() else f"# Benchmarks\n\n{BEGIN}\n{END}\n"
    new = replace_between_markers(text, render_section(Path(results_dir), output, plots), str(output))
    output.write_text(new)
    return new


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.render", description=__doc__.split("\n\n")[0])
    p.add_argument("--results-dir", default=str(RESULTS_DIR))
    p.add_argument("--output", default=str(DEFAULT_OUTPUT))
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    try:
        render(Path(args.results_dir), Path(args.output), plots=not args.no_plots)
    except (ResultsError, OSError, KeyError) as e:
        print(f"benchmarks.render: {e}", file=sys.stderr)
        return 1
    print(f"rendered {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
