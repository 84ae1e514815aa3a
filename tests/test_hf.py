"""Hugging Face specifics: the attention implementation switch, ViTMAE's shuffled tokens,
CLIP/SigLIP towers, global heads and pickling."""

from __future__ import annotations

import io

import pytest
import torch
from cases_hf import SMALL, first_layer, mae_noise
from families import first_output, randomize_tokens, unit_layer_scale

import attnmask

transformers = pytest.importorskip("transformers")
T = transformers


def tiny(model_cls, config_cls, seed=0, **config):
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**SMALL, **config})).eval()
    randomize_tokens(model, ("cls_token", "position_embeddings", "distillation_token", "register_tokens"))
    unit_layer_scale(model)
    return model


def images(batch=2, size=(40, 56), seed=1):
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


def run(model, x, **kwargs):
    with torch.no_grad():
        return first_output(model(x, interpolate_pos_encoding=True, **kwargs))


def layer_output(model, x, index=0, **kwargs):
    layers = [m for _, m in model.named_modules() if type(m).__name__.endswith("Layer") and "transformers" in type(m).__module__]
    seen = {}
    handle = layers[index].register_forward_hook(lambda m, a, out: seen.update(out=first_output(out)))
    try:
        run(model, x, **kwargs)
    finally:
        handle.remove()
    return seen["out"]


@pytest.mark.parametrize("previous", ["sdpa", "eager"])
def test_attention_implementation_selected_and_restored(previous):
    model = tiny(T.ViTModel, T.ViTConfig, attn_implementation=previous)
    assert model.config._attn_implementation == previous
    x = images()
    expected = run(model, x)
    attnmask.apply(model, heads=0, window=3)
    assert model.config._attn_implementation == previous  # nothing masked: nothing switched
    attnmask.apply(model, heads={1: "all"}, window=3)
    assert model.config._attn_implementation == "attnmask"
    # Layer 0 has no masked head: it runs the previous implementation, bit for bit.
    assert torch.equal(layer_output(model, x, 0), layer_output(tiny(T.ViTModel, T.ViTConfig, attn_implementation=previous), x, 0))
    assert not torch.allclose(run(model, x), expected, atol=1e-4)
    attnmask.remove(model)
    assert model.config._attn_implementation == previous
    assert torch.equal(run(model, x), expected)


def test_global_heads_of_the_first_layer_are_untouched():
    model = tiny(T.ViTModel, T.ViTConfig, num_hidden_layers=1)
    x = images()
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    outputs = {}

    def recorder(name):
        original = ALL_ATTENTION_FUNCTIONS[name]

        def spy(module, *args, **kwargs):
            out = original(module, *args, **kwargs)
            outputs[name] = out[0]
            return out

        return original, spy

    for name, heads in (("sdpa", None), ("attnmask", [1, 3])):
        original, spy = recorder(name)
        ALL_ATTENTION_FUNCTIONS[name] = spy
        try:
            if heads is not None:
                attnmask.apply(model, heads=heads, window=3)
            run(model, x)
        finally:
            ALL_ATTENTION_FUNCTIONS[name] = original
    before, after = outputs["sdpa"], outputs["attnmask"]  # (B, N, H, D)
    assert torch.equal(after[:, :, [0, 2]], before[:, :, [0, 2]])
    assert not torch.allclose(after[:, :, [1, 3]], before[:, :, [1, 3]], atol=1e-4)


def mae_tokens(model, x, noise):
    layer = first_layer(model)
    seen = {}
    handle = layer.register_forward_hook(lambda m, a, out: seen.update(out=first_output(out)))
    try:
        with torch.no_grad():
            model(x, noise=noise)
    finally:
        handle.remove()
    return seen["out"]


def test_vit_mae_random_masking_uses_each_samples_true_positions():
    """mask_ratio 0.75: each sample keeps a different subset of patches, shuffled."""
    model = tiny(T.ViTMAEModel, T.ViTMAEConfig, image_size=(40, 56), mask_ratio=0.75)
    attnmask.apply(model, heads={0: "all"}, window=3)
    x = images(batch=3)
    noise = mae_noise(3, 35)
    keep = int(35 * 0.25)
    shuffle = torch.argsort(noise, dim=1)
    before = mae_tokens(model, x, noise)
    assert before.shape[1] == 1 + keep
    for b in range(3):
        kept = shuffle[b, :keep].tolist()
        query_patch = kept[0]
        qr, qc = divmod(query_patch, 7)
        for p in kept[1:]:
            pr, pc = divmod(p, 7)
            perturbed = x.clone()
            perturbed[b, :, pr * 8 : pr * 8 + 8, pc * 8 : pc * 8 + 8] += 1.0
            after = mae_tokens(model, perturbed, noise)
            near = abs(pr - qr) <= 1 and abs(pc - qc) <= 1
            same = torch.equal(after[b, 1], before[b, 1])  # token 1 holds kept[0]
            assert same != near, f"sample {b}: query patch {query_patch} vs patch {p}, near={near}"
    attnmask.apply(model, heads={0: "all"}, window=3, backend="reference")
    torch.testing.assert_close(mae_tokens(model, x, noise), before, rtol=1e-4, atol=1e-5)


def test_vit_mae_pretraining_decoder_left_global():
    model = tiny(T.ViTMAEForPreTraining, T.ViTMAEConfig, decoder_hidden_size=32, decoder_num_hidden_layers=1,
                 decoder_num_attention_heads=4, decoder_intermediate_size=64)
    attnmask.apply(model, heads="all", window=3)
    report = attnmask.describe(model)
    assert all("decoder" not in row.name for row in report.layers)
    assert len(report.layers) == 2
    assert any("decoder" in note for note in report.notes)
    x = images(size=(40, 40))
    with torch.no_grad():
        loss = model(x, noise=mae_noise(2, 25)).loss
    assert torch.isfinite(loss)


def test_clip_model_patches_the_vision_tower_only():
    config = T.CLIPConfig(
        text_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=99),
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=40, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = T.CLIPModel(config).eval()
    ids = torch.randint(0, 99, (2, 6))
    x = images(size=(40, 40))
    with torch.no_grad():
        text_before = model.get_text_features(input_ids=ids)
        image_before = model.get_image_features(pixel_values=x)
    attnmask.apply(model, heads="all", window=3)
    report = attnmask.describe(model)
    assert report.family == "hf.clip"
    assert all("text" not in row.name for row in report.layers) and len(report.layers) == 2
    assert any("text-tower" in note for note in report.notes)
    with torch.no_grad():
        text_after = model.get_text_features(input_ids=ids)
        image_after = model.get_image_features(pixel_values=x)
    text_before, text_after, image_before, image_after = (
        first_output(t) for t in (text_before, text_after, image_before, image_after)
    )
    assert torch.equal(text_after, text_before)
    assert not torch.allclose(image_after, image_before, atol=1e-4)
    attnmask.remove(model)
    assert model.config.vision_config._attn_implementation == model.config.text_config._attn_implementation
    with torch.no_grad():
        assert torch.equal(first_output(model.get_image_features(pixel_values=x)), image_before)


def test_siglip_pooling_head_left_alone():
    model = tiny(T.SiglipVisionModel, T.SiglipVisionConfig)
    attnmask.apply(model, heads="all", window=3)
    assert any("pooling head" in note for note in attnmask.describe(model).notes)
    assert "note:" in str(attnmask.describe(model))


def test_beit_shared_relative_position_bias_kept():
    model = tiny(T.BeitModel, T.BeitConfig, use_shared_relative_position_bias=True)
    x = images()
    expected = run(model, x)
    attnmask.apply(model, heads="all", window=(9, 13))  # covering: only the bias acts
    torch.testing.assert_close(run(model, x), expected, rtol=1e-5, atol=1e-5)
    attnmask.apply(model, heads=[0, 1], window=3, backend="sdpa")
    fast = run(model, x)
    attnmask.apply(model, heads=[0, 1], window=3, backend="reference")
    torch.testing.assert_close(run(model, x), fast, rtol=1e-4, atol=1e-5)


def test_tokens_that_fit_no_grid_raise():
    model = tiny(T.ViTModel, T.ViTConfig)
    attnmask.apply(model, heads="all", window=3)
    run(model, images())
    hidden = torch.randn(1, 11, 32)
    layer = first_layer(model)
    with pytest.raises(ValueError, match="does not fit the patch grid"):
        with torch.no_grad():
            layer(hidden)


def test_pickled_patched_model_stays_patched():
    model = tiny(T.ViTModel, T.ViTConfig)
    attnmask.apply(model, heads=[0, 2], window=3)
    x = images()
    expected = run(model, x)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert attnmask.is_patched(loaded) and loaded.config._attn_implementation == "attnmask"
    assert torch.equal(run(loaded, x), expected)
    attnmask.remove(loaded)
    assert loaded.config._attn_implementation == "sdpa"


def test_describe_warns_when_the_implementation_was_switched_away():
    model = tiny(T.ViTModel, T.ViTConfig)
    attnmask.apply(model, heads="all", window=3)
    assert not any("inactive" in note for note in attnmask.describe(model).notes)
    model.set_attn_implementation("eager")
    assert any("inactive" in note for note in attnmask.describe(model).notes)
    attnmask.apply(model, heads="all", window=3)
    assert model.config._attn_implementation == "attnmask"
    attnmask.remove(model)
    assert model.config._attn_implementation == "eager"


def test_model_that_computes_attention_itself_goes_to_the_structural_adapter():
    """Data2VecVision copies BEiT but does not dispatch through ALL_ATTENTION_FUNCTIONS:
    selecting "attnmask" on its config would silently change nothing. It is patched by the
    structural adapter instead, which intercepts its own SDPA call; the check proves the masks
    act (zero weight outside the window, the perturbed patch's token where attnmask put it)."""
    from attnmask.coverage import check_model

    config = T.Data2VecVisionConfig(**SMALL)
    model = T.Data2VecVisionModel(config).eval()
    row = check_model(model, torch.randn(1, 3, 40, 40, generator=torch.Generator().manual_seed(0)))
    assert row["status"] == "patched" and row["family"] == "generic", row
    assert row["layout"] == "checked" and row["remove_identical"]
    assert config._attn_implementation != "attnmask"
