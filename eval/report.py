"""Turns a run's report.json content into report.md, a self-contained report.html and PNG plots.

The document is built once as a list of blocks (heading, paragraph, list, table, image, code) and rendered
twice, to Markdown and to HTML, so the two never drift apart. Every number is written by core.number_format,
as on the plots (eval/report_plots.py). Every optional part of the report may be missing: its section is then
left out rather than failing the run that produced it.
"""

from __future__ import annotations

import base64
import html
import os
from pathlib import Path

from core.number_format import MISSING, num, pct, ratio, score, score_with_err, si_bytes, si_params
from eval.headline_metrics import headline_metrics
from eval.latency import host_drift
from eval.report_plots import PLOTS, model_points
from eval.retained import retained_gain, retained_value

__all__ = ["NULL_REASONS", "retained_gain", "retained_value", "write_report"]

Block = tuple  # ("h1"|"h2"|"p"|"ul"|"table"|"img"|"code", payload...)

_CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
h1{border-bottom:2px solid #444}h2{border-bottom:1px solid #ccc;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0}th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f2f2f2}td{white-space:nowrap}td:first-child,th:first-child{text-align:left}
pre{background:#f6f6f6;padding:.6em;overflow-x:auto}img{max-width:100%;border:1px solid #ddd;margin:.4em 0}
.missing{color:#a00}
"""


# Why a report number can be undefined: written beside it as `<key>_null_reason` in report.json (strict JSON).
NULL_REASONS = {
    "retained": "undefined: the teacher's score is 0 or a score is missing",
    "retained_gain": "undefined: the teacher is not better than the baseline here, so there is no gain to recover",
    "retained_mean": "no headline task counts (summary.headline.not_counted says why) or none has a defined "
                     "retained value",
    "retained_gain_mean": "no headline task counts (summary.headline.not_counted says why) or none has a defined "
                          "retained gain",
    "estimate": "undefined: no task to average, or a score is missing",
    "low": "undefined: no bootstrap resample gave a defined value",
    "high": "undefined: no bootstrap resample gave a defined value",
    "stderr": "undefined: fewer than two bootstrap resamples",
    "speedup": "latency was not measured",
    "expert_spread": "no MoE layer was measured",
}


# ---------------------------------------------------------------- document


def _summary_paragraph(report: dict) -> str:
    t, s = report.get("teacher") or {}, report.get("student") or {}
    summ, run = report.get("summary") or {}, report.get("run") or {}
    t_params = f"{si_params(t.get('params_total'))} total / {si_params(t.get('params_active'))} active"
    s_params = f"{si_params(s.get('params_total'))}"
    text = (
        f"Teacher **{t.get('name', '?')}** ({t.get('architecture', '?')}, {t_params} parameters) was distilled "
        f"into student **{s.get('name', '?')}** ({s.get('architecture', '?')}, {s_params} parameters, "
        f"initialised from {s.get('init', '?')}). "
    )
    n = len(report.get("quality") or {})
    head = summ.get("headline")
    if head:
        over = f"{head.get('counted', 0)} of {head.get('tasks', 0)} tasks (those where the teacher is clear of " \
               "chance and of the baseline by 2 standard errors; the others are marked in the table)"
    else:
        over = f"{n} task metrics"
    if isinstance(summ.get("retained_mean"), (int, float)):
        text += f"The student keeps **{pct(summ['retained_mean'])}** of the teacher's quality on average over {over}"
    elif head:
        text += (f"No task counts in the headline retained quality ({head.get('counted', 0)} of "
                 f"{head.get('tasks', 0)} tasks: the teacher is not clear of chance or of the baseline by 2 standard "
                 "errors on any), so no retained-quality figure is given")
    else:
        text += "No retained-quality figure was recorded"
    if isinstance(summ.get("speedup"), (int, float)):
        text += f" and is **{ratio(summ['speedup'])}** the teacher's speed at `{summ.get('speedup_setting', '?')}`."
    else:
        text += "; no speedup was recorded."
    if isinstance(summ.get("retained_gain_mean"), (int, float)):
        ci = summ.get("retained_gain_mean_ci") or {}
        interval = (f" (95% bootstrap interval {_interval(ci, pct)})" if isinstance(ci.get("low"), (int, float))
                    and isinstance(ci.get("high"), (int, float)) else "")
        text += (f" Against a baseline (the same student trained on cross-entropy alone, same tokens and steps) it"
                 f" recovers **{pct(summ['retained_gain_mean'])}**{interval} of the teacher's advantage on average"
                 " over the same tasks.")
    if run:
        text += (f" Run `{run.get('name', '?')}`, preset `{run.get('preset', '?')}`, created {run.get('created', '?')}"
                 f" on {run.get('device', '?')}, commit `{run.get('git_commit', '?')}`.")
    return text


def _signed(x: object, key: str) -> str:
    """A difference in its metric's unit with its sign: '+4.0%', '-0.0031'."""
    text = score(x, key)
    return text if text == MISSING or text.startswith("-") else f"+{text}"


def _interval(ci: dict, fmt: object) -> str:
    """'[low, high]' of a bootstrap interval dict, each end written by fmt."""
    return f"[{fmt(ci.get('low'))}, {fmt(ci.get('high'))}]"


def _difference_cell(diff: dict | None, key: str) -> str:
    """'+4.0% [-8.0%, +16.0%]' and, when the 95% interval excludes zero, ' (excludes 0)'; '—' without one."""
    if not diff:
        return MISSING
    text = f"{_signed(diff.get('estimate'), key)} {_interval(diff, lambda v: _signed(v, key))}"
    return text + (" (excludes 0)" if diff.get("excludes_zero") else "")


def _headline_cell(q: dict) -> str:
    """'counted', 'not counted: <why>', or '' for a metric that is not its task's headline metric."""
    mark = q.get("headline")
    return str(mark.get("reason", "")) if isinstance(mark, dict) else ""


def _quality_table(quality: dict) -> Block:
    with_baseline = any("baseline" in q for q in quality.values())
    with_chance = any("chance" in q for q in quality.values())
    with_headline = any("headline" in q for q in quality.values())
    with_ci = any("student_minus_baseline" in q for q in quality.values())
    rows = []
    for name in sorted(quality):
        q = quality[name]
        err = q.get("stderr") or {}
        row = [
            name,
            "↑" if q.get("higher_is_better", True) else "↓",
            score_with_err(q.get("teacher"), err.get("teacher"), name),
            score_with_err(q.get("student_init"), err.get("student_init"), name),
            score_with_err(q.get("student"), err.get("student"), name),
            pct(q.get("retained")),
        ]
        if with_baseline:
            row[5:5] = [score_with_err(q.get("baseline"), err.get("baseline"), name)]
            row.append(pct(q.get("retained_gain")))
        if with_ci:
            row.append(_difference_cell(q.get("student_minus_baseline"), name))
        if with_chance:
            row[2:2] = [pct(q.get("chance"))]
        if with_headline:
            row.append(_headline_cell(q))
        rows.append(row)
    head = ["task/metric", "better", "teacher", "student before", "student after", "retained"]
    if with_baseline:
        head[5:5] = ["baseline (CE only)"]
        head.append("retained gain")
    if with_ci:
        head.append("student − baseline [95% CI]")
    if with_chance:
        head[2:2] = ["chance"]
    if with_headline:
        head.append("headline")
    return ("table", head, rows)


def _headline_text(report: dict) -> str | None:
    """The paragraph under the quality table on the headline rule and the bootstrap, or None without one."""
    summ = report.get("summary") or {}
    head = summ.get("headline")
    if not head:
        return None
    counted = ", ".join(f"`{k}`" for k in head.get("metrics") or []) or "none"
    text = (f"Headline: {head.get('counted', 0)} of {head.get('tasks', 0)} tasks count ({counted}). "
            f"{head.get('rule', '')}")
    diffs = [q["student_minus_baseline"] for q in (report.get("quality") or {}).values()
             if isinstance(q.get("student_minus_baseline"), dict)]
    ci = summ.get("retained_gain_mean_ci") or (diffs[0] if diffs else {})
    if ci:
        text += (f" Intervals: paired bootstrap over lm-eval's per-example scores, {num(ci.get('resamples'))} "
                 f"resamples (seed {ci.get('seed', '?')}), {ci.get('method', 'percentile')} 95% interval; the "
                 "teacher, student and baseline are rescored on the same resampled examples (held-out text: "
                 "documents resampled, bits per byte recomputed as a ratio of sums).")
    gci = summ.get("retained_gain_mean_ci") or {}
    if gci:
        n = gci.get("tasks", 0)
        text += (f" Mean retained gain {pct(gci.get('estimate'))}, 95% interval {_interval(gci, pct)} over "
                 f"{n} task{'s' * (n != 1)}")
        share = gci.get("undefined_share")
        text += (f"; {pct(share)} of resamples had a task where the teacher did not beat the baseline and were "
                 "left out." if isinstance(share, (int, float)) and share > 0 else ".")
    return text


def _gain_cell(row: dict) -> str:
    ci = row.get("retained_gain_mean_ci") or {}
    if not isinstance(ci.get("low"), (int, float)):
        return pct(row.get("retained_gain_mean"))
    mark = " *" if ci["low"] > 0 or ci["high"] < 0 else ""
    return f"{pct(row.get('retained_gain_mean'))} [{pct(ci['low'])}, {pct(ci['high'])}]{mark}"


def _students_blocks(section: dict, images: dict[str, Path]) -> list[Block]:
    """The run's students side by side (eval.students): quality kept, gain over each one's own CE baseline with
    its interval, speedups per decode setting, the Pareto front and the plot."""
    rows = section["rows"]
    settings = sorted({k for r in rows for k in (r.get("speedups") or {}) if k.startswith("decode")})
    table = [[r["name"] + (" (front)" if r.get("pareto") else ""), str(r.get("model", "?")), si_params(r.get("params")),
              pct(r.get("retained_mean")), pct(r.get("baseline_retained_mean")), _gain_cell(r)]
             + [ratio((r.get("speedups") or {}).get(k)) for k in settings] for r in rows]
    largest = section.get("largest_at_target")
    target = section.get("target_speedup")
    text = (f"Every student learned from the same teacher cache on the same tokens; each has its own cross-entropy "
            f"baseline, trained on the same tokens from the same initialisation. Retained = mean of score / "
            f"teacher's over each student's counted headline metrics; gain over CE = (student - its baseline) / "
            f"(teacher - its baseline), averaged, with its 95% paired bootstrap interval (* excludes zero). "
            f"Speedups against the teacher at its best per setting. (front): on the Pareto front of speedup at "
            f"`{section.get('setting')}` and retained quality. ")
    if any(not r.get("counted") for r in rows):
        text += ("A student whose headline counts no metric (its teacher is not measurably better than chance and "
                 "than its baseline on any) shows retained over every headline metric instead, and no gain. ")
    text += (f"The largest student at least {ratio(target)} faster at `{section.get('setting')}`: **{largest}**."
             if largest else f"No student is {ratio(target)} faster at `{section.get('setting')}`.")
    blocks: list[Block] = [("h2", "Students"),
                           ("table", ["student", "model", "params", "retained", "its CE baseline retained",
                                      "gain over CE [95%]"] + [f"speedup {k}" for k in settings], table),
                           ("p", text)]
    if "students" in images:
        blocks.append(("img", images["students"].name, "students: quality vs speedup"))
    return blocks


def _latency_table(latency: dict) -> Block:
    rows = []
    for key in sorted(latency):
        e = latency[key]
        fmt = si_bytes if e.get("metric") == "bytes" else num
        path = str(e.get("path") or "") + (f" / {e['student_path']}" if e.get("student_path") else "")
        rows.append([key, e.get("metric", "?"), path, fmt(e.get("teacher")),
                     str(e.get("teacher_implementation") or "stock"), fmt(e.get("student")), ratio(e.get("speedup"))])
    return ("table", ["setting", "metric", "path", "teacher", "teacher on", "student", "speedup (>1: student better)"],
            rows)


def _blocks(report: dict, images: dict[str, Path], run_dir: Path) -> list[Block]:
    run = report.get("run") or {}
    blocks: list[Block] = [("h1", f"Distillation report: {run.get('name', 'run')}"), ("p", _summary_paragraph(report))]
    if report.get("notes"):
        blocks += [("h2", "Notes"), ("ul", [str(n) for n in report["notes"]])]
    if report.get("quality"):
        blocks += [("h2", "Quality per task"), _quality_table(report["quality"])]
        headline = _headline_text(report)
        if headline:
            blocks.append(("p", headline))
        blocks.append(("p", "Retained = student / teacher (teacher / student where lower is better); "
                            "± is lm-eval's standard error where it gave one; chance = the accuracy of guessing "
                            "among a multiple-choice task's answers (dashed red line on the plot)."))
        if "quality_per_task" in images:
            blocks.append(("img", images["quality_per_task"].name, "quality per task"))
        if "quality_vs_speedup" in images:
            points = model_points(report)
            used = points[0]["metrics"] if points else headline_metrics(report["quality"])
            keys = ", ".join(f"`{k}`" for k in used)
            counted = any((q.get("headline") or {}).get("counted") for q in report["quality"].values())
            which = "one counted headline metric per task" if counted else "one headline metric per task"
            blocks += [("img", images["quality_vs_speedup"].name, "quality vs speedup"),
                       ("p", f"One point per model: retained quality averaged over {which} "
                             f"({keys}), ± one standard error from lm-eval's per-task standard errors (the "
                             f"teacher's scores as the reference), against the speedup at the headline setting.")]
    if (report.get("students") or {}).get("rows"):
        blocks += _students_blocks(report["students"], images)
    if report.get("latency"):
        blocks += [("h2", "Latency"), _latency_table(report["latency"])]
        blocks.append(("p", "Speedup = student/teacher for throughput, teacher/student for times and bytes, "
                            "against the teacher at its best in each setting (`teacher on`: stock transformers or "
                            "our fused MoE kernels, whichever was faster there). "
                            "`generate` = plain generate with a dynamic cache; `static_compile` = static cache "
                            "with the decode step compiled; `graph` = greedy decode on a static cache, each step "
                            "replayed from one CUDA graph (the model's own time per token, without generate's "
                            "per-token loop); `decode_best` = each model on its fastest of those timed "
                            "(path: teacher's / student's where they differ)."))
        drift = host_drift(report["latency"])
        if drift:
            worst = max(drift.values(), key=lambda r: abs(r - 1))
            blocks.append(("p", f"**Host conditions differed** between the teacher's and the student's timing: the "
                                f"host probe (a fixed loop of tiny device ops, timed just before each model) ran "
                                f"{ratio(worst)} as long for the student in {len(drift)} setting(s) "
                                f"({', '.join(sorted(drift))}). Where the host bounds a setting (batch-1 decode and "
                                f"time to first token of a small model), its speedup is not reliable: time again."))
    fused = report.get("teacher_fused") or {}
    if fused:
        rows = [[key, e.get("metric", "?"), str(e.get("path") or ""), num(e.get("teacher")), num(e.get("student")),
                 ratio(e.get("speedup"))] for key, e in sorted(fused.items()) if e.get("metric") != "bytes"]
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
                   ("p", f"{num(tr.get('steps'))} steps, {num(tr.get('tokens'))} tokens at "
                         f"{num(tr.get('tokens_per_s'))} tokens/s; final cross-entropy {num(tr.get('final_ce'))}, "
                         f"load-balancing loss {num(tr.get('final_aux'))} (top-k = perfectly even)."),
                   ("table", ["measure", "before", "after"],
                    [[label, num(before.get(k)), num(after.get(k))] for k, label in keys])]
        held = tune.get("heldout") or {}
        if held:
            d = held.get("after_minus_before") or {}
            change = (f"after minus before {d['estimate']:+.4f}, 95% interval [{d['low']:+.4f}, {d['high']:+.4f}]"
                      + ("" if d.get("excludes_zero") else ": not distinguishable from no change")
                      if d else "no per-document scores for an interval")
            origin = (f" (the teacher as upcycled, which computes the dense {held['before_is_dense']} exactly: "
                      "this is the MoE teacher against its dense origin)" if held.get("before_is_dense") else "")
            blocks.append(("p", f"Held-out text, bits per byte (lower is better): {num(held.get('before'))} before "
                                f"the continued training{origin}, {num(held.get('after'))} after ({change})."))
        spec = tune.get("specialisation_by_source") or {}
        names = sorted(set(spec.get("before") or {}) | set(spec.get("after") or {}))
        if names:
            blocks.append(("table", ["source", "specialisation before (bits)", "after (bits)"],
                           [[n, num((spec.get("before") or {}).get(n)), num((spec.get("after") or {}).get(n))]
                            for n in names]))
    cache = report.get("cache")
    if cache:
        blocks += [("h2", "Teacher logit cache"), ("table", ["path", "tokens", "top-k", "bytes", "bytes/token"],
                   [[str(cache.get("path", MISSING)), num(cache.get("tokens")), num(cache.get("k")),
                     si_bytes(cache.get("bytes")), si_bytes(cache.get("bytes_per_token"))]])]
    tr = report.get("training")
    if tr:
        secs, toks = tr.get("seconds"), tr.get("tokens")
        rate = toks / secs if isinstance(secs, (int, float)) and secs and isinstance(toks, (int, float)) else None
        blocks += [("h2", "Training"), ("table", ["steps", "tokens", "final loss", "final KD", "final CE", "seconds",
                                                  "tokens/s"],
                   [[num(tr.get("steps")), num(toks), num(tr.get("final_loss")), num(tr.get("final_kd")),
                     num(tr.get("final_ce")), num(secs), num(rate)]])]
        if "training_curves" in images:
            blocks.append(("img", images["training_curves"].name, "training curves"))
    router = report.get("router") or {}
    heatmaps = router.get("heatmaps") or []
    if heatmaps:
        blocks.append(("h2", "Router usage (teacher)"))
        mean = router.get("mean") or {}
        blocks.append(("table", ["MoE layers", "experts", "sequences", "load max/mean", "load CV",
                                 "routing entropy (1 = even)"],
                       [[num(len(router.get("layers") or [])), num(router.get("experts")),
                         num(router.get("sequences")), ratio(mean.get("load_max_over_mean")),
                         num(mean.get("load_cv")), num(mean.get("routing_entropy"))]]))
        spec = router.get("specialisation_js_bits") or {}
        if spec:
            blocks.append(("table", ["source", "specialisation (JS divergence from all text, bits)"],
                           [[s, num(v)] for s, v in sorted(spec.items(), key=lambda kv: -kv[1])]))
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
    # The empty icon keeps a browser from asking for /favicon.ico (a 404 in the console when served by MLflow).
    return (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'><link rel='icon' href='data:,'>"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>\n<body>\n" + "\n".join(body)
            + "\n</body></html>\n")


def write_report(report: dict, run_dir: Path) -> dict[str, Path]:
    """Write report.md, report.html (images embedded, so the one file opens anywhere) and the PNG plots that
    have data (quality_vs_speedup.png, quality_per_task.png, training_curves.png) into run_dir.

    Returns {"md", "html", and each plot written: "quality_vs_speedup", "quality_per_task", "training_curves"}
    -> path. Router heatmaps are read from report["router"]["heatmaps"] (absolute or relative to run_dir).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for key, plot in PLOTS:
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
