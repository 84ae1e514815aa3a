"""Hypothesis strategies for mask geometry."""

from hypothesis import strategies as st

odd = st.integers(min_value=0, max_value=8).map(lambda i: 2 * i + 1)


@st.composite
def geometries(draw, max_side: int = 6, max_heads: int = 4):
    """(grid, window, prefix_tokens, num_heads, heads, prefix): non-square grids, rectangular
    windows, windows larger than the grid, any head subset, 0-3 prefix tokens."""
    grid = (draw(st.integers(1, max_side)), draw(st.integers(1, max_side)))
    window = (draw(odd), draw(odd))
    prefix_tokens = draw(st.integers(0, 3))
    num_heads = draw(st.integers(1, max_heads))
    heads = tuple(sorted(draw(st.sets(st.integers(0, num_heads - 1)))))
    prefix = draw(st.sampled_from(["global", "isolated"]))
    return grid, window, prefix_tokens, num_heads, heads, prefix
