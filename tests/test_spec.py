"""Argument validation and the MaskSpec round trip."""

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from attnmask.spec import MaskSpec, normalize_window, resolve_heads


@pytest.mark.parametrize("window, expected", [(7, (7, 7)), (1, (1, 1)), ((3, 5), (3, 5)), ([5, 3], (5, 3))])
def test_window_forms(window, expected):
    assert normalize_window(window) == expected


@pytest.mark.parametrize(
    "window, error",
    [
        (0, ValueError), (-3, ValueError), (4, ValueError), ((3, 4), ValueError), ((0, 3), ValueError),
        ("7", TypeError), (7.0, TypeError), (True, TypeError), ((3,), TypeError), ((3, 5, 7), TypeError),
        (None, TypeError), ((3.0, 5), TypeError),
    ],
)
def test_bad_windows_name_argument_and_value(window, error):
    with pytest.raises(error) as info:
        normalize_window(window)
    assert "window=" in str(info.value) and repr(window) in str(info.value) and "odd" in str(info.value)


SIX = [6, 6, 6]


@pytest.mark.parametrize(
    "heads, expected",
    [
        (0, [(), (), ()]),
        (2, [(0, 1)] * 3),
        (6, [tuple(range(6))] * 3),
        (0.5, [(0, 1, 2)] * 3),
        (0.1, [(0,)] * 3),  # at least one head
        (1.0, [tuple(range(6))] * 3),
        ("all", [tuple(range(6))] * 3),
        ("none", [(), (), ()]),
        ([4, 1], [(1, 4)] * 3),
        ((), [(), (), ()]),
        ({0: "all", 2: [5]}, [tuple(range(6)), (), (5,)]),
        (lambda layer, layers, n: n if layer == 0 else 1, [tuple(range(6)), (0,), (0,)]),
    ],
)
def test_heads_forms(heads, expected):
    assert list(resolve_heads(heads, SIX)) == expected


def test_heads_per_layer_counts_differ():
    assert resolve_heads(0.5, [2, 4, 8]) == ((0,), (0, 1), (0, 1, 2, 3))
    with pytest.raises(ValueError, match="layer 0, which has 2 heads"):
        resolve_heads(3, [2, 4, 8])


@pytest.mark.parametrize(
    "heads, error, fragment",
    [
        (7, ValueError, "between 0 and 6"),
        (-1, ValueError, "between 0 and 6"),
        (0.0, ValueError, "(0, 1]"),
        (1.5, ValueError, "(0, 1]"),
        (float("nan"), ValueError, "(0, 1]"),
        ("half", ValueError, "'all', 'none'"),
        ([6], ValueError, "outside 0..5"),
        ([-1], ValueError, "outside 0..5"),
        ([0, 0], ValueError, "repeat"),
        ([0.5], TypeError, "ints"),
        ({3: 1}, ValueError, "0..2"),
        ({-1: 1}, ValueError, "0..2"),
        ({0: 7}, ValueError, "heads[0]"),
        (True, TypeError, "heads=True"),
        (None, TypeError, "expected"),
        (lambda layer, layers, n: "most", ValueError, "heads(0, 3, 6)"),
    ],
)
def test_bad_heads(heads, error, fragment):
    with pytest.raises(error) as info:
        resolve_heads(heads, SIX)
    assert fragment in str(info.value)


@st.composite
def specs(draw):
    num_layers = draw(st.integers(1, 6))
    num_heads = [draw(st.integers(1, 8)) for _ in range(num_layers)]
    heads = [tuple(sorted(draw(st.sets(st.integers(0, n - 1))))) for n in num_heads]
    window = (draw(st.integers(0, 6)) * 2 + 1, draw(st.integers(0, 6)) * 2 + 1)
    return MaskSpec(
        family=draw(st.sampled_from(["timm.vit", "other"])),
        layers=tuple(f"blocks.{i}.attn" for i in range(num_layers)),
        num_heads=tuple(num_heads),
        heads=tuple(heads),
        window=window,
        prefix=draw(st.sampled_from(["global", "isolated"])),
        backend=draw(st.sampled_from(["auto", "sdpa", "reference"])),
    )


@given(specs())
def test_spec_json_round_trip(spec):
    assert MaskSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


@pytest.mark.parametrize(
    "change, fragment",
    [
        ({"window": [4, 3]}, "window="),
        ({"heads": [[0, 9]]}, "outside 0..5"),
        ({"prefix": "sometimes"}, "prefix="),
        ({"backend": "magic"}, "backend="),
        ({"version": 99}, "version=99"),
        ({"layers": ["a", "b"]}, "one entry per attention layer"),
    ],
)
def test_spec_from_bad_dict(change, fragment):
    data = {"family": "timm.vit", "window": [3, 3], "layers": ["a"], "num_heads": [6], "heads": [[0]], **change}
    with pytest.raises(ValueError) as info:
        MaskSpec.from_dict(data)
    assert fragment in str(info.value)


@pytest.mark.parametrize("heads", [[[1.9]], [["03"]], [[True]], "ab", [5]])
def test_from_dict_refuses_heads_that_are_not_ints(heads):
    """A hand-edited 1.9 or "03" must not quietly become another head."""
    data = dict(family="timm.vit", window=3, layers=["blocks.0.attn"], num_heads=[4], heads=heads)
    with pytest.raises(ValueError, match="not accepted"):
        MaskSpec.from_dict(data)
