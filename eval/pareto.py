"""The Pareto front of quality against speed: the points no other point beats on both."""
from __future__ import annotations

import math


def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """For (x, y) points where both are better when larger: True where no other point is at least as good
    on both and strictly better on one. Points with a NaN coordinate are never on the front."""
    flags = []
    for i, (x, y) in enumerate(points):
        if math.isnan(x) or math.isnan(y):
            flags.append(False)
            continue
        dominated = any(
            j != i and xo >= x and yo >= y and (xo > x or yo > y) for j, (xo, yo) in enumerate(points)
            if not (math.isnan(xo) or math.isnan(yo))
        )
        flags.append(not dominated)
    return flags
