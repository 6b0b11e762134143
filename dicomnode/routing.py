"""Routing rules: which pipelines and destinations a series goes to.

A rule's `match` maps DICOM keywords to conditions, all of which must hold:

- a number or a string without regular-expression characters: equal (case-sensitive);
- any other string: a regular expression searched in the value (`"(?i)sag"`);
- `{min: a, max: b}`: a numeric range, either end optional;
- `{regex: r}` / `{equals: v}`: explicit forms;
- the pseudo-attribute `orientation`: `sagittal`, `axial` or `coronal`, from ImageOrientationPatient.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from dicomnode.config import Rule

_REGEX_CHARS = set("()[]{}.*+?^$|\\")


def orientation(iop: Any) -> str | None:
    """Plane of a slice from ImageOrientationPatient: the axis its normal is closest to."""
    try:
        v = np.array([float(x) for x in iop], dtype=float)
    except (TypeError, ValueError):
        return None
    if v.shape != (6,):
        return None
    n = np.abs(np.cross(v[:3], v[3:]))
    return ("sagittal", "coronal", "axial")[int(np.argmax(n))]


def attribute_value(attrs: dict[str, Any], key: str) -> Any:
    if key == "orientation":
        return orientation(attrs.get("ImageOrientationPatient"))
    return attrs.get(key)


def condition_holds(cond: Any, value: Any) -> bool:
    if value is None:
        return False
    if isinstance(cond, dict):
        if "equals" in cond:
            return str(value) == str(cond["equals"])
        if "regex" in cond:
            return re.search(str(cond["regex"]), str(value)) is not None
        try:
            v = float(value[0] if isinstance(value, list) else value)
        except (TypeError, ValueError):
            return False
        return ("min" not in cond or v >= float(cond["min"])) and ("max" not in cond or v <= float(cond["max"]))
    if isinstance(cond, (int, float)) and not isinstance(cond, bool):
        try:
            return float(value) == float(cond)
        except (TypeError, ValueError):
            return False
    text = "\\".join(map(str, value)) if isinstance(value, list) else str(value)
    cond = str(cond)
    if _REGEX_CHARS & set(cond):
        return re.search(cond, text) is not None
    return text == cond


def matches(rule: Rule, attrs: dict[str, Any]) -> bool:
    return all(condition_holds(c, attribute_value(attrs, k)) for k, c in rule.match.items())


def route(rules: list[Rule], attrs: dict[str, Any], mode: str = "first") -> list[Rule]:
    """The rules a series matches: the first one, or all of them."""
    hits = [r for r in rules if matches(r, attrs)]
    return hits[:1] if mode == "first" else hits
