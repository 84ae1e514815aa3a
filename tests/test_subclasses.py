"""Subclasses of a host's attention class: patched when they keep the host's forward, refused
by name when they override it, never skipped silently."""

import copy
import io
import pickle

import pytest
import torch
from helpers import images_for, make_timm, same_snapshot, snapshot

import attnmask

timm = pytest.importorskip("timm")
from timm.layers import Attention  # noqa: E402


class KeepsForward(Attention):
    """A user subclass that adds a method and keeps timm's forward."""

    def describe_me(self) -> str:
        return f"{self.num_heads} heads"


class OverridesForward(Attention):
    def forward(self, x, attn_mask=None, is_causal=False):
        return super().forward(x, attn_mask=attn_mask) * 0.5


def _swap(model, cls, blocks):
    for i in blocks:
        model.blocks[i].attn.__class__ = cls
    return model


def test_subclass_keeping_forward_is_patched_like_the_host():
    x = images_for("vit")
    reference = attnmask.apply(make_timm("vit"), heads="all", window=3)
    model = _swap(make_timm("vit"), KeepsForward, [1])
    attnmask.apply(model, heads="all", window=3)
    spec = attnmask.get_spec(model)
    assert spec.layers == ("blocks.0.attn", "blocks.1.attn") and spec.heads == ((0, 1, 2, 3),) * 2
    attn = model.blocks[1].attn
    assert isinstance(attn, KeepsForward) and attn.describe_me() == "4 heads"
    assert type(attn) is not KeepsForward  # the masked forward runs
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)
        copied = copy.deepcopy(model)
        torch.testing.assert_close(copied(x), reference(x), rtol=0, atol=0)
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        torch.testing.assert_close(loaded(x), reference(x), rtol=0, atol=0)
        assert type(pickle.loads(pickle.dumps(model)).blocks[1].attn) is type(attn)
    attnmask.remove(model)
    assert type(model.blocks[1].attn) is KeepsForward and type(model.blocks[0].attn) is Attention
    assert not any(k.startswith("_attnmask") for k in model.blocks[1].attn.__dict__)


def test_subclass_overriding_forward_is_refused_by_name():
    model = _swap(make_timm("vit"), OverridesForward, [1])
    before = snapshot(model)
    with pytest.raises(TypeError) as info:
        attnmask.apply(model, heads="all", window=3)
    message = str(info.value)
    assert "blocks.1.attn" in message and "OverridesForward" in message and "overrides forward" in message
    assert same_snapshot(before, snapshot(model)) and not attnmask.is_patched(model)
    rows = {row["name"]: row for row in attnmask.inspect(model).to_dict()["layers"]}
    assert rows["blocks.1.attn"]["status"] == "refused" and "overrides forward" in rows["blocks.1.attn"]["reason"]
    assert rows["blocks.0.attn"]["status"] == "patchable"


def test_torchvision_multihead_attention_subclass_is_patched():
    torchvision = pytest.importorskip("torchvision")
    from torchvision.models.vision_transformer import VisionTransformer

    class MyMHA(torch.nn.MultiheadAttention):
        pass

    def build():
        torch.manual_seed(0)
        return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64).eval()

    reference = attnmask.apply(build(), heads="all", window=3)
    model = build()
    model.encoder.layers[1].self_attention.__class__ = MyMHA
    attnmask.apply(model, heads="all", window=3)
    assert attnmask.get_spec(model).num_layers == 2
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)
    attnmask.remove(model)
    assert type(model.encoder.layers[1].self_attention) is MyMHA
    del torchvision


def test_jit_script_of_a_patched_torchvision_vit_says_what_to_use():
    pytest.importorskip("torchvision")
    from torchvision.models.vision_transformer import VisionTransformer

    model = VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=4, hidden_dim=32, mlp_dim=64).eval()
    attnmask.apply(model, heads=2, window=3)
    with pytest.raises(RuntimeError, match="torch.jit.script cannot compile a masked attention layer.*torch.compile"):
        torch.jit.script(model)
    attnmask.remove(model)
    torch.jit.script(model)  # unpatched, it scripts as before


def test_timm_features_only_vit_is_patched():
    torch.manual_seed(0)
    kwargs = dict(img_size=(40, 56), patch_size=8, embed_dim=32, depth=3, num_heads=4)
    plain = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs).eval()
    features = timm.create_model("vit_tiny_patch16_224", pretrained=False, features_only=True, **kwargs).eval()
    features.model.load_state_dict(plain.state_dict(), strict=False)
    attnmask.apply(features, heads="all", window=3)
    attnmask.apply(plain, heads="all", window=3)
    assert attnmask.get_spec(features).family == "timm.vit"
    assert attnmask.get_spec(features).layers == tuple(f"model.blocks.{i}.attn" for i in range(3))
    x = torch.randn(2, 3, 40, 56)
    with torch.no_grad():
        expected = plain.forward_intermediates(x, intermediates_only=True)
        torch.testing.assert_close(features(x)[-1], expected[-1], rtol=1e-5, atol=1e-5)
    attnmask.remove(features)
    assert type(features.model.blocks[0].attn) is Attention
