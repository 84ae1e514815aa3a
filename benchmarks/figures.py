"""The figures of the Performance page, drawn from one saved ``benchmarks/run.py`` result.

- :func:`plot_attention`: throughput ratio to dense SDPA per token count, one panel per
  (heads masked, pass), a line per backend.
- :func:`plot_tokens`: time ratio to dense SDPA (log scale) against the token count (log
  scale) for one pass, one panel per heads-masked setting, one line per backend; the lines of
  a backend's labelled variants share its colour.
- :func:`plot_models`: patched / unpatched throughput, one panel per (model, heads masked,
  mode), bars per image size and backend.

Used by ``benchmarks/plot.py`` (which writes the page); needs matplotlib.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any, Callable, Optional

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator  # noqa: E402

from attnmask.bench.report import model_heads  # noqa: E402

COARSE_TICKS = (0.03125, 0.0625, 0.125, 0.25, 0.5, 1, 2, 4, 8, 16, 32)
FINE_TICKS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1, 1.1, 1.2, 1.3, 1.4, 1.5, 1.75, 2, 2.5, 3, 4)

FAMILIES = ("sdpa-bool", "auto", "sdpa", "flex", "blocked")
"""Backends whose labelled variants (``flex-b64-rows``, ``blocked-8x16``) share their colour."""

VARIANT_STYLES = ("--", ":", "-.", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1)))
MARKERS = ("o", "s", "^", "v", "D", "P", "X")

Describe = Callable[[dict[str, Any], Optional[dict[str, Any]]], str]
"""``taken_on(env, settings)``: where a result was measured (``benchmarks/plot.py``'s)."""


def series(rows: list[dict[str, Any]], key: str) -> list[Any]:
    """The distinct values of ``key`` in ``rows``, in order of appearance."""
    return list(dict.fromkeys(r[key] for r in rows if key in r))


def colors(backends: list[str]) -> dict[str, Any]:
    """One colour per backend, the same in every panel of a figure."""
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {backend: cycle[i % len(cycle)] for i, backend in enumerate(backends)}


def family(backend: str) -> str:
    """The backend a labelled variant belongs to (``"blocked-8x8"`` -> ``"blocked"``)."""
    for name in sorted(FAMILIES, key=len, reverse=True):
        if backend == name or backend.startswith(f"{name}-"):
            return name
    return backend


def line_styles(backends: list[str]) -> dict[str, dict[str, Any]]:
    """Plot keywords per backend: a colour per family, a solid line for the registered
    backend and a dashed or dotted one, with its own marker, for each variant."""
    families = list(dict.fromkeys(family(b) for b in backends))
    palette = colors(families)
    styles, seen = {}, {name: 0 for name in families}
    for backend in backends:
        name = family(backend)
        index = seen[name]
        seen[name] += 1
        is_variant = backend != name
        styles[backend] = {
            "color": palette[name],
            "linestyle": VARIANT_STYLES[(index - 1) % len(VARIANT_STYLES)] if is_variant else "-",
            "marker": MARKERS[index % len(MARKERS)],
            "linewidth": 1.2 if is_variant else 1.8,
            "markersize": 4 if is_variant else 5,
        }
    return styles


def title(fig, text: str, width_in: float) -> None:
    """A suptitle wrapped to the figure's width."""
    fig.suptitle("\n".join(textwrap.wrap(text, width=int(width_in * 13))), fontsize=9)


def ratio_axis(ax) -> None:
    """Log-2 ratio axis with plain tick labels (0.5x, 1x, 2x), finer ticks on a narrow range.

    Call after plotting: the ticks are chosen from the data's limits."""
    ax.set_yscale("log", base=2)
    low, high = ax.get_ylim()
    for candidates in (COARSE_TICKS, FINE_TICKS):
        ticks = [t for t in candidates if low <= t <= high]
        if len(ticks) >= 3:
            break
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}x"))


def legend(fig, axes, ncol: int = 6) -> None:
    """One legend below the panels, with every label any panel has."""
    handles, names = [], []
    for ax in axes.flat:
        for handle, name in zip(*ax.get_legend_handles_labels()):
            if name not in names:
                handles.append(handle)
                names.append(name)
    fig.legend(handles, names, loc="lower center", ncol=min(max(len(names), 1), ncol), fontsize=8, frameon=False)


def plot_attention(data: dict[str, Any], path: Path, describe: Describe) -> None:
    """Ratio to dense SDPA against tokens: one panel per (heads masked, pass), a line per backend."""
    rows = data["attention"]
    labels, passes, backends = series(rows, "heads_label"), series(rows, "pass"), series(rows, "backend")
    tokens, styles = series(rows, "tokens"), line_styles(backends)
    width_in = 5.2 * len(passes)
    fig, axes = plt.subplots(len(labels), len(passes), figsize=(width_in, 3.6 * len(labels)), squeeze=False, sharex=True)
    for i, label in enumerate(labels):
        for j, pass_ in enumerate(passes):
            ax = axes[i][j]
            for backend in backends:
                points = [(tokens.index(r["tokens"]), r["ratio"]) for r in rows
                          if r["heads_label"] == label and r["pass"] == pass_ and r["backend"] == backend and "ratio" in r]
                if points:
                    ax.plot(*zip(*points), label=backend, **styles[backend])
            ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--", label="dense SDPA")
            ratio_axis(ax)
            ax.set_title(f"{label} heads masked, {pass_}", fontsize=10)
            ax.set_xticks(range(len(tokens)))
            batches = {r["tokens"]: r["batch"] for r in rows}
            ax.set_xticklabels([f"{t}\n(batch {batches[t]})" for t in tokens], fontsize=8)
            ax.set_ylabel("ratio to dense SDPA (>1 faster)", fontsize=8)
            ax.grid(True, alpha=0.3)
    legend(fig, axes)
    title(fig, f"Attention level: {describe(data['env'], data.get('settings'))}", width_in)
    fig.tight_layout(rect=(0, 0.07 + 0.02 * (len(backends) // 6), 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def token_rows(data: dict[str, Any], pass_: str) -> list[dict[str, Any]]:
    """The measured attention rows of ``pass_`` (what :func:`plot_tokens` draws)."""
    return [r for r in data.get("attention", []) if r.get("pass") == pass_ and "ms" in r and r.get("baseline_ms")]


def plot_tokens(data: dict[str, Any], pass_: str, path: Path, describe: Describe) -> None:
    """Time ratio to dense SDPA (``ms / baseline_ms``, log scale; below 1: faster than dense)
    against the token count (log scale) for ``pass_``: one panel per heads-masked setting,
    one line per backend."""
    rows = token_rows(data, pass_)
    if not rows:
        raise ValueError(f"no measured {pass_} rows to plot")
    labels, backends = series(rows, "heads_label"), series(rows, "backend")
    tokens, styles = sorted(series(rows, "tokens")), line_styles(backends)
    width_in = max(5.0 * len(labels), 7.0)
    fig, axes = plt.subplots(1, len(labels), figsize=(width_in, 4.4), squeeze=False, sharey=True)
    for j, label in enumerate(labels):
        ax = axes[0][j]
        for backend in backends:
            points = sorted((r["tokens"], r["ms"] / r["baseline_ms"]) for r in rows if r["heads_label"] == label and r["backend"] == backend)
            if points:
                ax.plot(*zip(*points), label=backend, **styles[backend])
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--", label="dense SDPA (1x)")
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(FixedLocator(tokens))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.tick_params(axis="x", labelsize=8)
        masked = next((r for r in rows if r["heads_label"] == label), {})
        ax.set_title(f"{label} heads masked ({masked.get('heads_masked', '?')}/{masked.get('heads', '?')}), {pass_}", fontsize=10)
        ax.set_xlabel("tokens (1 class token + g x g patches)", fontsize=8)
        ax.grid(True, which="major", alpha=0.3)
    for ax in axes.flat:
        ratio_axis(ax)
    axes[0][0].set_ylabel("time / dense SDPA time (<1: faster)", fontsize=8)
    legend(fig, axes, ncol=5)
    title(fig, f"Attention time relative to dense SDPA, {pass_}: {describe(data['env'], data.get('settings'))}", width_in)
    extra = 0.03 * ((len(backends) + 1) // 5)
    fig.tight_layout(rect=(0, 0.08 + extra, 1, 0.93))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_models(data: dict[str, Any], path: Path, describe: Describe) -> None:
    """Patched/unpatched throughput: one panel per (model, heads masked, mode), bars per size
    and backend. Rows without a heads setting (skipped rows of older results) go on every
    panel of their model and mode."""
    rows = data["models"]
    modes = series(rows, "mode")
    panels = list(dict.fromkeys((r["model"], model_heads(r)) for r in rows if model_heads(r) != "-"))
    panels += [(m, "-") for m in series(rows, "model") if not any(model == m for model, _ in panels)]
    backends = [b for b in series(rows, "backend") if b != "all"]
    palette, width_in = colors(backends), max(5.2 * len(modes), 7.0)
    fig, axes = plt.subplots(len(panels), len(modes), figsize=(width_in, 3.4 * len(panels)), squeeze=False)
    width = 0.8 / max(len(backends), 1)
    for i, (model, heads) in enumerate(panels):
        for j, mode in enumerate(modes):
            ax = axes[i][j]
            chosen = [r for r in rows if r["model"] == model and r["mode"] == mode and model_heads(r) in (heads, "-")]
            sizes = series(chosen, "image_size")
            for b, backend in enumerate(backends):
                bars = [(sizes.index(r["image_size"]) + (b - (len(backends) - 1) / 2) * width, r["ratio"])
                        for r in chosen if r.get("backend") == backend and "ratio" in r]
                if bars:
                    ax.bar(*zip(*bars), width=width, label=backend, color=palette[backend])
            for r in chosen:
                if "skipped" in r:
                    ax.text(sizes.index(r["image_size"]), 1.0, "skipped", ha="center", va="bottom", fontsize=8)
            ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--", label="unpatched")
            ax.set_xticks(range(len(sizes)))
            ax.set_xticklabels([f"{s} px" for s in sizes])
            depth = next((r["depth"] for r in chosen if r.get("depth") is not None), None)
            name = f"{model} (depth {depth})" if depth is not None else model
            ax.set_title(f"{name}, {mode}" + (f", {heads} heads masked" if heads != "-" else ""), fontsize=9)
            ax.set_ylabel("patched / unpatched throughput", fontsize=8)
            ax.grid(True, axis="y", alpha=0.3)
    legend(fig, axes)
    title(fig, f"Whole models: {describe(data['env'], data.get('settings'))}", width_in)
    fig.tight_layout(rect=(0, 0.06 / max(len(panels) / 2, 1), 1, 1 - 0.06 / max(len(panels) / 2, 1)))
    fig.savefig(path, dpi=110)
    plt.close(fig)
