"""Turns a run's report.json content into report.md, a self-contained report.html and two PNG plots.

The document is built once as a list of blocks (heading, paragraph, list, table, image, code) and rendered
twice, to Markdown and to HTML, so the two never drift apart. Every optional part of the report may be
missing: its section is then left out rather than failing the run that produced it.
"""

from __future__ import annotations

import base64
import html
import math
import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: the pipeline runs on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402

Block = tuple  # ("h1"|"h2"|"p"|"ul"|"table"|"img"|"code", payload...)

_CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
h1{border-bottom:2px solid #444}h2{border-bottom:1px solid #ccc;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0}th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f2f2f2}td:first-child,th:first-child{text-align:left}
pre{background:#f6f6f6;padding:.6em;overflow-x:auto}img{max-width:100%;border:1px solid #ddd;margin:.4em 0}
.missing{color:#a00}
"""


# Why a report number can be undefined: written beside it as `<key>_null_reason` in report.json (strict JSON).
NULL_REASONS = {
    "retained": "undefined: the teacher's score is 0 or a score is missing",
    "retained_gain": "undefined: the teacher is not better than the baseline here, so there is no gain to recover",
    "retained_mean": "no metric has a defined retained value",
    "retained_gain_mean": "no metric where the teacher is better than the baseline",
    "speedup": "latency was not measured",
    "expert_spread": "no MoE layer was measured",
}


def retained_value(teacher: float, student: float, higher_is_better: bool) -> float:
    """Share of the teacher's quality the student keeps: student/teacher, or teacher/student when lower is
    better (perplexity, bits per byte), so 1.0 = parity and > 1 = the student is better. NaN if undefined."""
    num, den = (student, teacher) if higher_is_better else (teacher, student)
    if den is None or num is None or den == 0:
        return float("nan")
    return float(num) / float(den)


def retained_gain(teacher: float, student: float, baseline: float, higher_is_better: bool = True) -> float:
    """How much of the teacher's advantage over the baseline (the same student trained without the teacher)
    the distilled student recovers: (student - baseline) / (teacher - baseline). 1.0 = all of it, 0 = none,
    < 0 = distillation hurt; the same formula holds for lower-is-better metrics. NaN when the teacher has
    no advantage to recover (it is not better than the baseline), where the ratio would mislead."""
    if teacher is None or student is None or baseline is None:
        return float("nan")
    edge = (float(teacher) - float(baseline)) * (1 if higher_is_better else -1)
    if edge <= 0:
        return float("nan")
    return (float(student) - float(baseline)) / (float(teacher) - float(baseline))


# ---------------------------------------------------------------- formatting


def _num(x: Any, digits: int = 4) -> str:
    """Number for a table cell; '—' for missing or NaN."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 1e6 else f"{x:,.0f}"
    return str(x)


def _params(n: Any) -> str:
    """Parameter count as 1.23B / 135M / 12.3K."""
    if not isinstance(n, (int, float)):
        return "?"
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return str(int(n))


def _bytes(n: Any) -> str:
    if not isinstance(n, (int, float)):
        return "—"
    for div, unit in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if abs(n) >= div:
            return f"{n / div:.3g} {unit}"
    return f"{int(n)} B"


def _pct(x: Any) -> str:
    return "—" if not isinstance(x, (int, float)) or math.isnan(x) else f"{100 * x:.1f}%"


def _with_err(value: Any, err: Any) -> str:
    """'0.512 ± 0.013'; the stderr is dropped when lm-eval gave none (None or 'N/A')."""
    if isinstance(err, (int, float)) and not math.isnan(err):
        return f"{_num(value)} ± {_num(err, 2)}"
    return _num(value)


# ---------------------------------------------------------------- plots


def _plot_quality_vs_speedup(report: dict, path: Path) -> bool:
    """x: speedup (student over teacher, > 1 = faster); y: retained quality. Per-task points and their mean
    sit at the headline speedup; the mean is repeated, hollow, at every other timed setting's speedup."""
    quality = report.get("quality") or {}
    summary = report.get("summary") or {}
    headline = summary.get("speedup")
    if not quality or not isinstance(headline, (int, float)):
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    retained = {k: v.get("retained") for k, v in quality.items()}
    finite = {k: r for k, r in retained.items() if isinstance(r, (int, float)) and math.isfinite(r)}
    for i, (task, r) in enumerate(sorted(finite.items())):
        ax.scatter([headline], [r], s=30, color=plt.cm.tab10(i % 10), label=task, zorder=3)
    mean = summary.get("retained_mean")
    if not isinstance(mean, (int, float)) and finite:
        mean = sum(finite.values()) / len(finite)
    if isinstance(mean, (int, float)):
        ax.scatter([headline], [mean], s=220, marker="*", color="black", zorder=4,
                   label=f"mean @ {summary.get('speedup_setting', 'headline')}")
        for key, entry in sorted((report.get("latency") or {}).items()):
            sp = entry.get("speedup")
            if key == summary.get("speedup_setting") or entry.get("metric") == "bytes":
                continue
            if isinstance(sp, (int, float)) and math.isfinite(sp):
                ax.scatter([sp], [mean], s=60, facecolors="none", edgecolors="gray", zorder=2)
                ax.annotate(key, (sp, mean), textcoords="offset points", xytext=(4, 4), fontsize=7, color="gray")
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.axvline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_xlabel("speedup of student over teacher (×)")
    ax.set_ylabel("retained quality (student / teacher)")
    ax.set_title("Quality kept vs speed gained")
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _plot_quality_per_task(report: dict, path: Path) -> bool:
    """One small panel per task metric (their scales differ: accuracy vs perplexity), three bars each."""
    quality = report.get("quality") or {}
    if not quality:
        return False
    names = sorted(quality)
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), squeeze=False)
    roles = (("teacher", "#4c72b0"), ("student_init", "#bbbbbb"), ("student", "#dd8452"))
    for ax, name in zip(axes.flat, names):
        q = quality[name]
        stderr = q.get("stderr") or {}
        vals = [q.get(r) if isinstance(q.get(r), (int, float)) else 0.0 for r, _ in roles]
        # NaN draws no error bar at all, where 0 would draw a misleading flat cap.
        errs = [stderr.get(r) if isinstance(stderr.get(r), (int, float)) else math.nan for r, _ in roles]
        ax.bar(range(3), vals, yerr=errs, color=[c for _, c in roles], capsize=3)
        positive = [v for v in vals if v > 0]
        if positive and max(positive) / min(positive) > 20:
            ax.set_yscale("log")  # an untrained init's perplexity would flatten the two bars that matter
        ax.set_xticks(range(3), ["teacher", "init", "student"], fontsize=8)
        arrow = "↑" if q.get("higher_is_better", True) else "↓"
        ax.set_title(f"{name} {arrow}", fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---------------------------------------------------------------- document


def _summary_paragraph(report: dict) -> str:
    t, s = report.get("teacher") or {}, report.get("student") or {}
    summ, run = report.get("summary") or {}, report.get("run") or {}
    t_params = f"{_params(t.get('params_total'))} total / {_params(t.get('params_active'))} active"
    s_params = f"{_params(s.get('params_total'))}"
    text = (
        f"Teacher **{t.get('name', '?')}** ({t.get('architecture', '?')}, {t_params} parameters) was distilled "
        f"into student **{s.get('name', '?')}** ({s.get('architecture', '?')}, {s_params} parameters, "
        f"initialised from {s.get('init', '?')}). "
    )
    n = len(report.get("quality") or {})
    if isinstance(summ.get("retained_mean"), (int, float)):
        text += f"The student keeps **{_pct(summ['retained_mean'])}** of the teacher's quality on average over {n} task metrics"
    else:
        text += "No retained-quality figure was recorded"
    if isinstance(summ.get("speedup"), (int, float)):
        text += f" and is **{summ['speedup']:.2f}×** the teacher's speed at `{summ.get('speedup_setting', '?')}`."
    else:
        text += "; no speedup was recorded."
    if isinstance(summ.get("retained_gain_mean"), (int, float)):
        text += (f" Against a baseline (the same student trained on cross-entropy alone, same tokens and steps) it"
                 f" recovers **{_pct(summ['retained_gain_mean'])}** of the teacher's advantage on average.")
    if run:
        text += (f" Run `{run.get('name', '?')}`, preset `{run.get('preset', '?')}`, created {run.get('created', '?')}"
                 f" on {run.get('device', '?')}, commit `{run.get('git_commit', '?')}`.")
    return text


def _quality_table(quality: dict) -> Block:
    with_baseline = any("baseline" in q for q in quality.values())
    rows = []
    for name in sorted(quality):
        q = quality[name]
        err = q.get("stderr") or {}
        row = [
            name,
            "↑" if q.get("higher_is_better", True) else "↓",
            _with_err(q.get("teacher"), err.get("teacher")),
            _with_err(q.get("student_init"), err.get("student_init")),
            _with_err(q.get("student"), err.get("student")),
            _pct(q.get("retained")),
        ]
        if with_baseline:
            row[5:5] = [_with_err(q.get("baseline"), err.get("baseline"))]
            row.append(_pct(q.get("retained_gain")))
        rows.append(row)
    head = ["task/metric", "better", "teacher", "student before", "student after", "retained"]
    if with_baseline:
        head[5:5] = ["baseline (CE only)"]
        head.append("retained gain")
    return ("table", head, rows)


def _latency_table(latency: dict) -> Block:
    rows = []
    for key in sorted(latency):
        e = latency[key]
        fmt = _bytes if e.get("metric") == "bytes" else _num
        rows.append([key, e.get("metric", "?"), str(e.get("path") or ""), fmt(e.get("teacher")),
                     fmt(e.get("student")), f"{_num(e.get('speedup'), 3)}×"])
    return ("table", ["setting", "metric", "path", "teacher", "student", "speedup (>1: student better)"], rows)


def _blocks(report: dict, images: dict[str, Path], run_dir: Path) -> list[Block]:
    run = report.get("run") or {}
    blocks: list[Block] = [("h1", f"Distillation report: {run.get('name', 'run')}"), ("p", _summary_paragraph(report))]
    if report.get("notes"):
        blocks += [("h2", "Notes"), ("ul", [str(n) for n in report["notes"]])]
    if report.get("quality"):
        blocks += [("h2", "Quality per task"), _quality_table(report["quality"])]
        blocks.append(("p", "Retained = student / teacher (teacher / student where lower is better); "
                            "± is lm-eval's standard error where it gave one."))
        for key in ("quality_per_task", "quality_vs_speedup"):
            if key in images:
                blocks.append(("img", images[key].name, key.replace("_", " ")))
    if report.get("latency"):
        blocks += [("h2", "Latency"), _latency_table(report["latency"])]
        blocks.append(("p", "Speedup = student/teacher for throughput, teacher/student for times and bytes. "
                            "`generate` = plain generate with a dynamic cache; `static_compile` = static cache "
                            "with the decode step compiled."))
    fused = report.get("teacher_fused") or {}
    if fused:
        rows = [[key, e.get("metric", "?"), str(e.get("path") or ""), _num(e.get("teacher")), _num(e.get("student")),
                 f"{_num(e.get('speedup'), 3)}×"] for key, e in sorted(fused.items()) if e.get("metric") != "bytes"]
        blocks += [("h2", "Teacher on our fused MoE kernels"),
                   ("table", ["setting", "metric", "path", "teacher, stock", "teacher, fused",
                              "speedup (>1: fused better)"], rows)]
    tune = report.get("teacher_tune") or {}
    if tune:
        tr = tune.get("training") or {}
        before, after = tune.get("before") or {}, tune.get("after") or {}
        keys = [("expert_spread", "expert spread (0 = copies)"), ("routing_entropy", "routing entropy (1 = even)"),
                ("load_cv", "load CV"), ("specialisation_js_bits", "specialisation by source (JS bits, mean)")]
        blocks += [("h2", "Teacher's continued training"),
                   ("p", f"{_num(tr.get('steps'))} steps, {_num(tr.get('tokens'))} tokens at "
                         f"{_num(tr.get('tokens_per_s'))} tokens/s; final cross-entropy {_num(tr.get('final_ce'))}, "
                         f"load-balancing loss {_num(tr.get('final_aux'))} (top-k = perfectly even)."),
                   ("table", ["measure", "before", "after"],
                    [[label, _num(before.get(k)), _num(after.get(k))] for k, label in keys])]
        spec = tune.get("specialisation_by_source") or {}
        names = sorted(set(spec.get("before") or {}) | set(spec.get("after") or {}))
        if names:
            blocks.append(("table", ["source", "specialisation before (bits)", "after (bits)"],
                           [[n, _num((spec.get("before") or {}).get(n)), _num((spec.get("after") or {}).get(n))]
                            for n in names]))
    cache = report.get("cache")
    if cache:
        blocks += [("h2", "Teacher logit cache"), ("table", ["path", "tokens", "top-k", "bytes", "bytes/token"],
                   [[str(cache.get("path", "—")), _num(cache.get("tokens")), _num(cache.get("k")),
                     _bytes(cache.get("bytes")), _num(cache.get("bytes_per_token"))]])]
    tr = report.get("training")
    if tr:
        secs, toks = tr.get("seconds"), tr.get("tokens")
        rate = toks / secs if isinstance(secs, (int, float)) and secs and isinstance(toks, (int, float)) else None
        blocks += [("h2", "Training"), ("table", ["steps", "tokens", "final loss", "final KD", "final CE", "seconds",
                                                  "tokens/s"],
                   [[_num(tr.get("steps")), _num(toks), _num(tr.get("final_loss")), _num(tr.get("final_kd")),
                     _num(tr.get("final_ce")), _num(secs), _num(rate)]])]
    router = report.get("router") or {}
    heatmaps = router.get("heatmaps") or []
    if heatmaps:
        blocks.append(("h2", "Router usage (teacher)"))
        mean = router.get("mean") or {}
        blocks.append(("table", ["MoE layers", "experts", "sequences", "load max/mean", "load CV",
                                 "routing entropy (1 = even)"],
                       [[_num(len(router.get("layers") or [])), _num(router.get("experts")),
                         _num(router.get("sequences")), _num(mean.get("load_max_over_mean")),
                         _num(mean.get("load_cv")), _num(mean.get("routing_entropy"))]]))
        spec = router.get("specialisation_js_bits") or {}
        if spec:
            blocks.append(("table", ["source", "specialisation (JS divergence from all text, bits)"],
                           [[s, _num(v)] for s, v in sorted(spec.items(), key=lambda kv: -kv[1])]))
        # Relative to the report where they sit under it, so the report folder can be moved or committed.
        # Both sides resolved: a run folder reached through a symbolic link still gets relative links.
        root = run_dir.resolve()
        blocks += [("img", os.path.relpath(Path(h).resolve(), root) if Path(h).resolve().is_relative_to(root)
                    else str(h), Path(h).stem) for h in heatmaps]
    ml = report.get("mlflow")
    if ml:
        blocks += [("h2", "MLflow"), ("table", ["experiment id", "parent run id", "tracking uri"],
                   [[str(ml.get("experiment_id", "—")), str(ml.get("parent_run_id", "—")),
                     str(ml.get("tracking_uri", "—"))]])]
    if run.get("command"):
        blocks += [("h2", "Reproduce"), ("code", run["command"])]
    return blocks


def _to_markdown(blocks: list[Block]) -> str:
    out: list[str] = []
    for b in blocks:
        kind = b[0]
        if kind == "h1":
            out += [f"# {b[1]}", ""]
        elif kind == "h2":
            out += [f"## {b[1]}", ""]
        elif kind == "p":
            out += [b[1], ""]
        elif kind == "ul":
            out += [f"- {item}" for item in b[1]] + [""]
        elif kind == "table":
            header, rows = b[1], b[2]
            out.append("| " + " | ".join(header) + " |")
            out.append("|" + "|".join("---" for _ in header) + "|")
            out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
            out.append("")
        elif kind == "img":
            out += [f"![{b[2]}]({b[1]})", ""]
        elif kind == "code":
            out += ["```", b[1], "```", ""]
    return "\n".join(out)


def _inline_md(text: str) -> str:
    """The two inline Markdown forms the blocks use (**bold**, `code`), as HTML, after escaping."""
    parts = html.escape(text).split("**")
    text = "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))
    parts = text.split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def _to_html(blocks: list[Block], run_dir: Path, title: str) -> str:
    body: list[str] = []
    for b in blocks:
        kind = b[0]
        if kind in ("h1", "h2"):
            body.append(f"<{kind}>{html.escape(b[1])}</{kind}>")
        elif kind == "p":
            body.append(f"<p>{_inline_md(b[1])}</p>")
        elif kind == "ul":
            body.append("<ul>" + "".join(f"<li>{_inline_md(i)}</li>" for i in b[1]) + "</ul>")
        elif kind == "table":
            head = "".join(f"<th>{html.escape(h)}</th>" for h in b[1])
            rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in b[2])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif kind == "img":
            png = run_dir / b[1]
            if png.is_file():
                # Embedded, so the single HTML file can be mailed or attached as an MLflow artifact.
                data = base64.b64encode(png.read_bytes()).decode("ascii")
                body.append(f'<img alt="{html.escape(b[2])}" src="data:image/png;base64,{data}">')
            else:
                body.append(f'<p class="missing">missing image: {html.escape(b[1])}</p>')
        elif kind == "code":
            body.append(f"<pre><code>{html.escape(b[1])}</code></pre>")
    return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n")


def write_report(report: dict, run_dir: Path) -> dict[str, Path]:
    """Write report.md, report.html, quality_vs_speedup.png and quality_per_task.png into run_dir.

    Returns {"md", "html", and each plot that had data: "quality_vs_speedup", "quality_per_task"} -> path.
    Router heatmaps are read from report["router"]["heatmaps"], paths relative to run_dir.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for key, plot in (("quality_vs_speedup", _plot_quality_vs_speedup), ("quality_per_task", _plot_quality_per_task)):
        path = run_dir / f"{key}.png"
        if plot(report, path):
            written[key] = path
    blocks = _blocks(report, written, run_dir)
    written["md"] = run_dir / "report.md"
    written["md"].write_text(_to_markdown(blocks), encoding="utf-8")
    title = f"Distillation report: {(report.get('run') or {}).get('name', 'run')}"
    written["html"] = run_dir / "report.html"
    written["html"].write_text(_to_html(blocks, run_dir, title), encoding="utf-8")
    return written
