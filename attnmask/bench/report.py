"""Markdown tables of benchmark results (printed by ``attnmask bench``, used in the docs)."""

from __future__ import annotations

from typing import Any, Iterable


def fmt_ms(ms: float) -> str:
    """A time in ms with about three significant digits, never in exponent notation."""
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    if ms >= 0.1:
        return f"{ms:.2f}"
    return f"{ms:.3f}"


def cell(row: dict[str, Any] | None) -> str:
    """``"1.52x (0.35 ms)"``, or why there is no number."""
    if row is None:
        return "-"
    if "skipped" in row:
        return "skipped"
    if "error" in row:
        return "error"
    return f"{row['ratio']:.2f}x ({fmt_ms(row['ms'])} ms)"


def _unique(values: Iterable[Any]) -> list[Any]:
    return list(dict.fromkeys(values))


def _table(header: list[str], lines: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(line) + " |" for line in lines]
    return "\n".join(out)


def attention_table(rows: list[dict[str, Any]]) -> str:
    """One line per (tokens, heads masked, pass); one column per backend: ratio to dense SDPA
    (above 1: faster than dense) and the time per call."""
    if not rows:
        return ""
    backends = _unique(r["backend"] for r in rows)
    keys = _unique((r["tokens"], r["batch"], r["heads_label"], r["heads_masked"], r["pass"]) for r in rows)
    lines = []
    for key in keys:
        group = {r["backend"]: r for r in rows if (r["tokens"], r["batch"], r["heads_label"], r["heads_masked"], r["pass"]) == key}
        base = next((r["baseline_ms"] for r in group.values() if "baseline_ms" in r), None)
        tokens, batch, label, masked, pass_ = key
        lines.append(
            [f"{tokens} ({batch})", f"{label} ({masked}/{next(iter(group.values()))['heads']})", pass_,
             fmt_ms(base) if base is not None else "error"]
            + [cell(group.get(name)) for name in backends]
        )
    return _table(["tokens (batch)", "heads masked", "pass", "dense SDPA ms", *backends], lines)


def model_heads(row: dict[str, Any]) -> str:
    """``"half"``/``"all"`` (or the fraction) of a model row; ``"-"`` when it has none."""
    if row.get("heads_label"):
        return row["heads_label"]
    if isinstance(row.get("heads"), (int, float)):
        from .settings import heads_label

        return heads_label(row["heads"])
    return "-"


def _model_key(row: dict[str, Any]) -> tuple:
    return row["model"], row["image_size"], row["mode"], model_heads(row)


def models_table(rows: list[dict[str, Any]]) -> str:
    """One line per (model, size, mode, heads masked); one column per backend: throughput of
    the patched model relative to the unpatched one (above 1: faster) and the time per call.
    A ``depth`` column appears when the rows record it (``--depth``)."""
    if not rows:
        return ""
    backends = _unique(r["backend"] for r in rows if "backend" in r and r["backend"] != "all")
    keys = _unique(_model_key(r) for r in rows)
    with_depth = any(r.get("depth") is not None for r in rows)
    lines = []
    for key in keys:
        group = [r for r in rows if _model_key(r) == key]
        first = group[0]
        by_backend = {r.get("backend"): r for r in group}
        base = next((r["baseline_ms"] for r in group if "baseline_ms" in r), None)
        if "skipped" in first or "all" in by_backend:
            cells = [cell(first)] * len(backends)
        else:
            cells = [cell(by_backend.get(name)) for name in backends]
        window = "x".join(map(str, first["window"])) if "window" in first else "-"
        depth = [str(first["depth"]) if first.get("depth") is not None else "-"] if with_depth else []
        lines.append(
            [f"`{key[0]}`", str(key[1]), *depth, str(first.get("batch", "-")), key[2], key[3], window,
             fmt_ms(base) if base is not None else "-", *cells]
        )
    header = ["model", "px", *(["depth"] if with_depth else []), "batch", "mode", "heads masked", "window", "unpatched ms"]
    return _table([*header, *backends], lines)


def problems(rows: list[dict[str, Any]]) -> list[str]:
    """One line per distinct error or skip reason, naming the backends and the rows it hit."""
    reasons: dict[str, tuple[list[str], list[str]]] = {}
    for r in rows:
        reason = r.get("error") or r.get("skipped")
        if reason:
            if "tokens" in r:
                where = f"{r['tokens']} tokens {r['pass']}"
            else:
                heads = f" ({r['heads_label']} heads)" if r.get("heads_label") else ""
                where = f"{r['model']} {r['image_size']} px {r['mode']}{heads}"
            backends, places = reasons.setdefault(reason, ([], []))
            backends.append(r.get("backend", "all"))
            places.append(where)
    return [
        f"{', '.join(_unique(backends))} on {', '.join(_unique(places))}: {reason}"
        for reason, (backends, places) in reasons.items()
    ]


def tables(result: dict[str, Any]) -> str:
    """The attention and model tables of one result, with their errors, as Markdown."""
    parts = []
    if result.get("attention"):
        parts += ["Attention level: ratio to dense SDPA in the same process (above 1: faster), time per call.", "",
                  attention_table(result["attention"]), ""]
    if result.get("models"):
        parts += ["Model level: throughput of the patched model relative to the unpatched one (above 1: faster), "
                  "time per call.", "", models_table(result["models"]), ""]
    notes = problems(result.get("attention", []) + result.get("models", []))
    if notes:
        parts += ["Not measured:", ""] + [f"- {line}" for line in notes] + [""]
    return "\n".join(parts)
