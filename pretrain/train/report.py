"""`pretrain report RUN_DIR`: a run's curves in one PNG and the same figure in a small self-contained HTML page,
from the files the run directory already holds (metrics.jsonl, val.jsonl, resumes.jsonl): what a user on a cluster
looks at without forwarding a port to TensorBoard.

Panels over steps: loss (and validation loss), learning rate, tokens/s, MFU (on a device without a known peak:
the achieved model TFLOP/s per rank instead), data-wait fraction, skipped samples (cumulative, per reason). Every
resume is a dashed vertical line at the step it resumed from.
"""

from __future__ import annotations

import html
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pretrain.train.run_log import METRICS, RESUMES

PNG, HTML = "report.png", "report.html"
_MAX_POINTS = 4000  # per curve: a long run is thinned evenly, so the SVG in the page stays small


@dataclass
class RunCurves:
    rows: list[dict[str, Any]]
    val: list[dict[str, Any]] = field(default_factory=list)
    resumes: list[dict[str, Any]] = field(default_factory=list)
    torn: int = 0  # lines that were not JSON (a line cut by a crash mid-write)


def _read_jsonl(path: Path) -> tuple[list[dict[str, Any]], int]:
    if not path.is_file():
        return [], 0
    rows, torn = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            torn += 1
    return rows, torn


def read_run(run_dir: Path) -> RunCurves:
    run_dir = Path(run_dir)
    if not (run_dir / METRICS).is_file():
        raise FileNotFoundError(f"{run_dir}: no {METRICS} (give a run directory: run.output_dir of a run that "
                                "logged at least one step)")
    rows, torn = _read_jsonl(run_dir / METRICS)
    val, _ = _read_jsonl(run_dir / "val.jsonl")
    resumes, _ = _read_jsonl(run_dir / RESUMES)
    return RunCurves([r for r in rows if "step" in r], val, resumes, torn)


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), int | float)]
    stride = max(1, len(pts) // _MAX_POINTS)
    pts = pts[::stride]
    return [p[0] for p in pts], [p[1] for p in pts]


def _panels(curves: RunCurves) -> list[tuple[str, str, dict[str, tuple[list, list]]]]:
    """(title, y label, {legend: (steps, values)}) per panel."""
    rows = curves.rows
    loss = {"train": _series(rows, "loss")}
    if curves.val:
        loss["validation"] = _series(curves.val, "val_loss")
    if any(r.get("mfu") is not None for r in rows):
        compute = ("MFU", "model FLOPs utilisation", {"mfu": _series(rows, "mfu")})
    else:
        compute = ("MFU: no peak known for this device", "achieved model TFLOP/s per rank",
                   {"TFLOP/s per rank": _series(rows, "tflops_per_rank")})
    reasons = sorted({k for r in rows for k, v in (r.get("skipped") or {}).items() if v})
    skipped = {reason: ([r["step"] for r in rows], [(r.get("skipped") or {}).get(reason, 0) for r in rows])
               for reason in reasons}
    return [("loss", "loss", loss), ("learning rate", "lr", {"lr": _series(rows, "lr")}),
            ("throughput", "tokens/s", {"tokens/s": _series(rows, "tokens_per_s")}), compute,
            ("data wait", "fraction of step time", {"data wait": _series(rows, "data_wait_frac")}),
            ("skipped samples", "samples (cumulative)", skipped)]


def figure(curves: RunCurves, title: str) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 8), constrained_layout=True, sharex=True)
    for ax, (name, ylabel, lines) in zip(axes.flat, _panels(curves)):
        for legend, (x, y) in lines.items():
            ax.plot(x, y, label=legend, marker="." if len(x) < 50 else None, linewidth=1.2)
        for i, r in enumerate(curves.resumes):
            ax.axvline(r["step"], color="tab:red", linestyle="--", linewidth=1,
                       label="resumed" if i == 0 else None)
        if not any(x for x, _ in lines.values()):
            ax.text(0.5, 0.5, f"no {name}", ha="center", va="center", transform=ax.transAxes, color="gray")
        ax.set_title(name)
        ax.xaxis.set_tick_params(labelbottom=True)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    return fig


def _summary(curves: RunCurves) -> list[tuple[str, str]]:
    rows = curves.rows
    last = rows[-1] if rows else {}
    out = [("steps logged", f"{len(rows)} (last step {last.get('step', '-')})"),
           ("last loss", f"{last.get('loss')}"), ("tokens seen", f"{last.get('tokens_seen', '-')}")]
    if curves.val:
        out.append(("last validation loss", f"{curves.val[-1].get('val_loss')} at step {curves.val[-1]['step']}"))
    for r in curves.resumes:
        redone = r.get("logged_through", r["step"]) - r["step"]
        out.append(("resumed", f"from step {r['step']}" + (f" ({redone} logged steps redone)" if redone > 0 else "")))
    if curves.torn:
        out.append(("unreadable metrics lines", str(curves.torn)))
    return out


def write_report(run_dir: Path, out_dir: Path | None = None) -> tuple[Path, Path]:
    """report.png and report.html in `out_dir` (default: the run directory); returns their paths."""
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir else run_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    curves = read_run(run_dir)
    title = f"{run_dir.resolve().name}: {len(curves.rows)} logged steps, {len(curves.resumes)} resume(s)"
    fig = figure(curves, title)
    png, page = out_dir / PNG, out_dir / HTML
    fig.savefig(png, dpi=100)
    svg = io.StringIO()
    fig.savefig(svg, format="svg")
    import matplotlib.pyplot as plt

    plt.close(fig)
    table = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in _summary(curves))
    body = svg.getvalue()
    body = body[body.index("<svg"):]  # inline: the XML prolog and doctype do not belong inside HTML
    page.write_text(f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                    "<style>body{font-family:sans-serif;margin:1em} th{text-align:left;padding-right:1em} "
                    f"svg{{max-width:100%;height:auto}}</style></head><body><h1>{html.escape(title)}</h1>"
                    f"<table>{table}</table>\n{body}\n</body></html>\n")
    return png, page
