"""How every human-facing number of a run is written: the report's Markdown and HTML, its plots and the router
heatmaps all call these, so a figure reads the same wherever it appears.

The rules: shares of something (retained quality, accuracy, routing shares) are percentages with one decimal;
ratios (speedups, max/mean) have two decimals and a ×; bytes and parameter counts use decimal (SI) prefixes
with three significant digits; other measurements have three significant digits (thousands separated above
1,000); a standard error is written in its value's unit (two significant digits where it is no percentage).
Missing or undefined values (None, NaN, a string such as lm-eval's 'N/A') are written as an em dash.
"""

from __future__ import annotations

import math
from typing import Any

MISSING = "—"

# Metrics whose values are shares in [0, 1] (lm-eval's accuracies), written as percentages.
PROPORTION_METRICS = frozenset({"acc", "acc_norm", "exact_match", "f1", "mc1", "mc2", "em"})


def _finite(x: Any) -> float | None:
    """x as a float when it is a finite real number (bool excluded), else None."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _sig3(v: float) -> str:
    """Three significant digits, trailing zeros kept ('4.30'); zero is '0'."""
    return "0" if v == 0 else f"{v:#.3g}".rstrip(".")  # '#' keeps 4.30's zero; the dot of '100.' goes


def pct(x: Any) -> str:
    """Share -> '85.0%' (0.85 is 85.0%)."""
    v = _finite(x)
    return MISSING if v is None else f"{100 * v:.1f}%"


def ratio(x: Any) -> str:
    """Ratio -> '1.85×'."""
    v = _finite(x)
    return MISSING if v is None else f"{v:.2f}×"


def num(x: Any) -> str:
    """A measurement: three significant digits, thousands separated from 1,000 on ('4,538,470', '12.4', '0.250');
    an int is written whole ('1,024')."""
    if isinstance(x, int) and not isinstance(x, bool):
        return f"{x:,}"
    v = _finite(x)
    if v is None:
        return MISSING
    if abs(float(f"{v:.3g}")) >= 1000:  # rounded first: 999.96 is '1,000', not '1.00e+03'
        return f"{v:,.0f}"
    return _sig3(v)


def _si(x: Any, prefixes: tuple[str, ...], unit: str, sep: str) -> str:
    v = _finite(x)
    if v is None:
        return MISSING
    rounded = abs(float(f"{v:.3g}"))  # 999.7 B is '1.00 kB', not '1.00e+03 B'
    for power, prefix in zip((12, 9, 6, 3), prefixes):
        if rounded >= 10 ** power:
            return f"{_sig3(v / 10 ** power)}{sep}{prefix}{unit}"
    return f"{_sig3(v)}{sep}{unit}" if unit else _sig3(v)


def si_bytes(x: Any) -> str:
    """Bytes with decimal prefixes: 4.8e9 -> '4.80 GB', 300e6 -> '300 MB', 31.25 -> '31.2 B'."""
    return _si(x, ("T", "G", "M", "k"), "B", " ")


def si_params(x: Any) -> str:
    """Parameter count with the usual decimal suffixes: 1.2e9 -> '1.20B', 3.49e6 -> '3.49M', 12_300 -> '12.3K'."""
    return _si(x, ("T", "B", "M", "K"), "", "")


def is_proportion(metric_key: str) -> bool:
    """Whether a 'task/metric' (or bare metric) key holds a share in [0, 1], written as a percentage."""
    return metric_key.rsplit("/", 1)[-1] in PROPORTION_METRICS


def score(x: Any, metric_key: str) -> str:
    """A benchmark score in its metric's format: accuracy 0.25 -> '25.0%', perplexity 12.44 -> '12.4'."""
    return pct(x) if is_proportion(metric_key) else num(x)


def stderr(err: Any, metric_key: str) -> str:
    """A standard error in its value's unit: a percentage for accuracies ('1.3%'), else two significant digits."""
    v = _finite(err)
    if v is None:
        return MISSING
    return pct(v) if is_proportion(metric_key) else f"{v:.2g}"


def score_with_err(value: Any, err: Any, metric_key: str) -> str:
    """'25.0% ± 25%'; the error is left out where lm-eval gave none (None, NaN or 'N/A')."""
    if _finite(err) is None or _finite(value) is None:
        return score(value, metric_key)
    return f"{score(value, metric_key)} ± {stderr(err, metric_key)}"
