"""attnmask removes the hooks it registered by their handles: hooks of anyone else on the
same modules survive apply/remove, also when they are attnmask objects (a tool of attnmask's
own, such as a locality recorder, running on the patched model)."""

import copy

import pytest
import torch
from helpers import images_for, make_timm

import attnmask

pytest.importorskip("timm")


class Recorder:
    """A user's hook object; its class claims an attnmask module (as attnmask's own tools'
    hooks do), which a sweep by owner module would take for attnmask's."""

    __module__ = "attnmask.locality"

    def __init__(self):
        self.calls = 0

    def __call__(self, module, args, output=None):
        self.calls += 1


def _hooks(model):
    return {n: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for n, m in model.named_modules()}


def _user_hooks(model, modules):
    recorders = []
    for module in modules:
        for register in (module.register_forward_hook, module.register_forward_pre_hook):
            recorder = Recorder()
            register(recorder)
            recorders.append(recorder)
        module.register_forward_hook(lambda m, a, o: None)
    return recorders


def test_timm_user_hooks_survive_apply_and_remove():
    model = make_timm("vit_dynamic")
    recorders = _user_hooks(model, [model.patch_embed, model.blocks[0].attn])
    before = _hooks(model)
    attnmask.apply(model, heads=2, window=3)
    assert _hooks(model) != before  # the dynamic grid's hook on the patch embedding
    with torch.no_grad():
        model(images_for("vit_dynamic"))
    attnmask.remove(model)
    assert _hooks(model) == before
    assert all(r.calls == 1 for r in recorders)


def test_copy_removes_its_own_hooks():
    model = attnmask.apply(make_timm("vit_dynamic"), heads=2, window=3)
    copied = copy.deepcopy(model)
    _user_hooks(copied, [copied.patch_embed])
    before = {n: len(m._forward_hooks) for n, m in copied.named_modules()}
    attnmask.remove(copied)
    after = {n: len(m._forward_hooks) for n, m in copied.named_modules()}
    assert after["patch_embed"] == before["patch_embed"] - 1
    assert attnmask.is_patched(model) and len(model.patch_embed._forward_hooks) == 1


def test_hf_user_hooks_survive_apply_and_remove():
    T = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = T.ViTModel(T.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=40, patch_size=8)).eval()
    conv = model.embeddings.patch_embeddings.projection
    recorders = _user_hooks(model, [conv])
    before = _hooks(model)
    attnmask.apply(model, heads=2, window=3)
    assert _hooks(model) != before
    attnmask.remove(model)
    assert _hooks(model) == before and len(recorders) == 2
