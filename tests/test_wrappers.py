"""Wrappers (torch.compile, DataParallel) and argument holes of the public API."""

import numpy as np
import pytest
import torch
from helpers import images_for, make_timm, same_snapshot, snapshot

import attnmask
from attnmask.api import unwrap

pytest.importorskip("timm")

MASKS = dict(heads="all", window=1)


def _lively(model):
    """Large attention logits, so that masks visibly move the outputs of a tiny model."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("qkv.weight"):
                param.normal_(std=0.5)
    return model


def test_compiled_wrapper_sees_apply_and_remove():
    """A wrapper compiled before apply recompiles after apply and after remove (dynamo's guards
    check the swapped classes); is_patched/describe/get_spec/remove see the model inside."""
    model, x = _lively(make_timm("vit")), images_for("vit")
    with torch.no_grad():
        plain = model(x)
        attnmask.apply(model, **MASKS)
        masked = model(x)
        attnmask.remove(model)
    assert (masked - plain).abs().max() > 1e-3
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), plain, rtol=0, atol=1e-6)
        assert attnmask.apply(compiled, **MASKS) is compiled
        assert attnmask.is_patched(compiled) and attnmask.is_patched(model)
        assert attnmask.get_spec(compiled) == attnmask.get_spec(model)
        assert "_attnmask_spec" not in compiled.__dict__
        assert attnmask.describe(compiled).to_dict() == attnmask.describe(model).to_dict()
        torch.testing.assert_close(compiled(x), masked, rtol=0, atol=1e-6)
        assert attnmask.remove(compiled) is compiled
        assert not attnmask.is_patched(compiled) and not attnmask.is_patched(model)
        assert type(model.blocks[0].attn).__name__ == "Attention"
        torch.testing.assert_close(compiled(x), plain, rtol=0, atol=1e-6)


def test_data_parallel_wrappers_are_seen_through():
    model, x = make_timm("vit"), images_for("vit")
    wrapped = torch.compile(torch.nn.DataParallel(model), backend="eager")
    attnmask.apply(wrapped, heads=2, window=3)
    assert attnmask.is_patched(wrapped) and attnmask.is_patched(model)
    assert unwrap(wrapped) is model
    assert attnmask.inspect(wrapped).to_dict() == attnmask.inspect(model).to_dict()
    attnmask.remove(wrapped)
    assert not attnmask.is_patched(model)
    assert type(model.blocks[0].attn).__name__ == "Attention"
    del x


@pytest.mark.parametrize("function", ["remove", "describe", "get_spec", "is_patched", "inspect", "apply", "mask_cache"])
@pytest.mark.parametrize("value", [None, "vit", 3])
def test_non_module_model_is_a_type_error_naming_model(function, value):
    with pytest.raises(TypeError) as info:
        getattr(attnmask, function)(value)
    message = str(info.value)
    assert f"model={value!r}" in message and "torch.nn.Module" in message


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(heads=b"\x00"), "heads=b'\\x00'"),
        (dict(heads=bytearray(b"\x01")), "heads=bytearray"),
        (dict(heads={0: b"\x01"}), "heads[0]=b'\\x01'"),
        (dict(heads=lambda layer, layers, n: b"\x00"), "heads(0, 2, 4)=b'\\x00'"),
        (dict(heads=True), "heads=True"),
        (dict(heads=[True]), "heads=[True]"),
        (dict(heads={True: 1}), "heads={True: ...}"),
        (dict(window=b"\x03\x03"), "window=b'\\x03\\x03'"),
        (dict(window=True), "window=True"),
        (dict(window=(True, 3)), "window=(True, 3)"),
    ],
)
def test_bytes_and_bools_are_refused(kwargs, fragment):
    model = make_timm("vit")
    before = snapshot(model)
    with pytest.raises((TypeError, ValueError)) as info:
        attnmask.apply(model, **{"heads": 1, "window": 3, **kwargs})
    assert fragment in str(info.value)
    if isinstance(kwargs.get("heads", kwargs.get("window")), (bytes, bytearray)):
        assert info.type is TypeError
    assert same_snapshot(before, snapshot(model))


def test_numpy_integers_are_accepted():
    model = make_timm("vit")
    attnmask.apply(model, heads=np.int64(2), window=np.int32(3))
    assert attnmask.get_spec(model).heads == ((0, 1), (0, 1))
    attnmask.apply(model, heads={np.int64(1): [np.int64(0)]}, window=(np.int64(3), 5))
    assert attnmask.get_spec(model).heads == ((), (0,))
