"""Attention Locality Score (``locality_scores``) and the head-search rule (``suggest_heads``).

The ALS of a head is the mean over images and patch queries of the attention probability on
the patch keys inside the query's window (prefix tokens are neither queries nor local keys).
Checked against numbers worked out by hand, against properties (a head forced local scores 1,
uniform attention scores mean |W(n)| / N, counted here with plain loops), across families
(a timm and a Hugging Face ViT sharing weights score the same), and for leaving the model
exactly as it was.
"""

from __future__ import annotations

import re
import sys
import threading

import pytest
import torch
from helpers import images_for, make_timm, naive_attention, same_snapshot, snapshot

import attnmask
from attnmask.adapters import find_adapter
from attnmask.kernels import get_kernel, reference_attention
from attnmask.kernels.record import attention_probs, is_recording, recording, recording_attention
from attnmask.locality import HOST_ATTENTION_FAMILIES, local_weight
from attnmask.masks import LocalMask

timm = pytest.importorskip("timm")


def scores_of(model, images, window=3, **kwargs):
    return attnmask.locality_scores(model, images, window, progress=False, **kwargs)


def uniform_expectation(grid, window, prefix_tokens, kept=None) -> float:
    """mean over patch queries of |W(n)| / N, with plain loops (``kept``: the patches present)."""
    rows, cols = grid
    patches = [(r, c) for r in range(rows) for c in range(cols)]
    if kept is not None:
        patches = [patches[i] for i in kept]
    tokens = prefix_tokens + len(patches)
    total = 0.0
    for r, c in patches:
        inside = sum(1 for (r2, c2) in patches if abs(r - r2) <= window[0] // 2 and abs(c - c2) <= window[1] // 2)
        total += inside / tokens
    return total / len(patches)


# -- the definition, by hand ----------------------------------------------------------------


def test_local_weight_by_hand_with_a_class_token():
    # A 1 x 3 grid after one class token: tokens [cls, p0, p1, p2]. A 3-wide window:
    # p0 sees p0, p1; p1 sees p0, p1, p2; p2 sees p1, p2. The class token is never local.
    mask = LocalMask(grid=(1, 3), window=(1, 1), prefix_tokens=1, num_heads=2, heads=())
    head0 = [
        [0.25, 0.25, 0.25, 0.25],  # class-token query: not counted
        [0.10, 0.20, 0.30, 0.40],  # p0: 0.2 + 0.3 = 0.5
        [0.50, 0.10, 0.10, 0.30],  # p1: 0.1 + 0.1 + 0.3 = 0.5
        [0.00, 0.60, 0.30, 0.10],  # p2: 0.3 + 0.1 = 0.4
    ]
    head1 = [[1.0, 0.0, 0.0, 0.0]] * 4  # everything on the class token: 0
    probs = torch.tensor([[head0, head1]], dtype=torch.float64)
    weight = local_weight(probs, mask, (1, 3))
    torch.testing.assert_close(weight, torch.tensor([[[0.5, 0.5, 0.4], [0.0, 0.0, 0.0]]], dtype=torch.float64))
    # ALS = mean over the patch queries: (0.5 + 0.5 + 0.4) / 3 for head 0.
    assert weight.mean(-1)[0, 0].item() == pytest.approx(1.4 / 3)
    # A 1 x 1 window keeps the diagonal only: (0.2 + 0.1 + 0.1) / 3.
    assert local_weight(probs, mask, 1).mean(-1)[0, 0].item() == pytest.approx(0.4 / 3)


def test_local_weight_by_hand_on_rows_and_columns():
    # A 2 x 2 grid, no prefix: tokens [a b / c d]. Window (1, 3) = own row; (3, 1) = own column.
    mask = LocalMask(grid=(2, 2), window=(3, 3), prefix_tokens=0, num_heads=1, heads=())
    probs = torch.tensor(
        [[[[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25], [0.7, 0.0, 0.1, 0.2]]]],
        dtype=torch.float64,
    )
    rows = local_weight(probs, mask, (1, 3))[0, 0]  # a: a+b, b: a+b, c: c+d, d: c+d
    torch.testing.assert_close(rows, torch.tensor([0.7, 0.3, 0.5, 0.3], dtype=torch.float64))
    cols = local_weight(probs, mask, (3, 1))[0, 0]  # a: a+c, b: b+d, c: a+c, d: b+d
    torch.testing.assert_close(cols, torch.tensor([0.6, 0.6, 0.5, 0.2], dtype=torch.float64))
    assert local_weight(probs, mask, 3)[0, 0].tolist() == pytest.approx([1.0, 1.0, 1.0, 1.0])


def test_local_weight_by_hand_at_per_sample_positions():
    # ViTMAE-like: a 1 x 3 grid, the sequence holds [cls, p2, p0] (p1 was dropped).
    # p2's window holds p1, p2: only p2 is present; p0's holds p0, p1: only p0.
    positions = torch.tensor([[0, 3, 1]])
    mask = LocalMask(grid=(1, 3), window=(1, 1), prefix_tokens=1, num_heads=1, heads=(), positions=positions)
    probs = torch.tensor([[[[0.2, 0.3, 0.5], [0.2, 0.5, 0.3], [0.1, 0.6, 0.3]]]], dtype=torch.float64)
    torch.testing.assert_close(local_weight(probs, mask, 3), torch.tensor([[[0.5, 0.3]]], dtype=torch.float64))


# -- the recording kernel -------------------------------------------------------------------


def qkv(num_heads=3, tokens=13, dim=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(2, num_heads, tokens, dim, generator=generator) for _ in range(3)]


@pytest.mark.parametrize("host", [None, "additive", "boolean"])
def test_recording_kernel_equals_reference(host):
    q, k, v = qkv()
    mask = LocalMask(grid=(3, 4), window=(3, 3), prefix_tokens=1, num_heads=3, heads=(0, 2), layer=0)
    attn_mask = None
    if host == "additive":
        attn_mask = torch.randn(3, 13, 13, generator=torch.Generator().manual_seed(3))
    elif host == "boolean":
        attn_mask = torch.rand(13, 13, generator=torch.Generator().manual_seed(3)) > 0.2
        attn_mask |= torch.eye(13, dtype=torch.bool)
    seen = []
    with recording(lambda probs, m: seen.append((probs, m))):
        out = recording_attention(q, k, v, mask, attn_mask=attn_mask, scale=0.3)
    expected = reference_attention(q, k, v, mask, attn_mask=attn_mask, scale=0.3)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    (probs, recorded), = seen
    assert recorded is mask and probs.shape == (2, 3, 13, 13)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 3, 13))


def test_recording_kernel_soft_mode_sets_logits_to_zero():
    q, k, v = qkv(num_heads=2, tokens=10)
    mask = LocalMask(grid=(3, 3), window=(1, 1), prefix_tokens=1, num_heads=2, heads=(1,), mode="soft")
    bias = torch.randn(2, 10, 10, generator=torch.Generator().manual_seed(5))
    logits = q.double() @ k.double().transpose(-2, -1) * 8**-0.5
    allowed = mask.dense()
    expected = torch.where(allowed, logits, 0.0) + bias.double()  # restrict first, then the host bias
    probs = attention_probs(q, k, mask, attn_mask=bias)
    torch.testing.assert_close(probs.double(), expected.softmax(-1), rtol=1e-5, atol=1e-6)


def test_recording_is_per_thread_and_only_while_active():
    assert get_kernel("sdpa") is not recording_attention
    seen = {}
    with recording(lambda probs, m: None):
        assert get_kernel("sdpa") is recording_attention
        thread = threading.Thread(target=lambda: seen.update(other=is_recording()))
        thread.start()
        thread.join()
    assert seen == {"other": False}
    assert not is_recording()
    with pytest.raises(ValueError, match="dropout_p"):
        recording_attention(*qkv(), LocalMask((3, 4), (3, 3), 1, 3, ()), dropout_p=0.1)


# -- properties on models -------------------------------------------------------------------


def test_forced_local_heads_score_one_and_the_others_do_not():
    model = attnmask.apply(make_timm("vit"), heads={0: [0, 1], 1: [2]}, window=3, prefix="isolated")
    scores = scores_of(model, images_for("vit"))
    assert scores.shape == (2, 4) and scores.dtype == torch.float64
    for layer, head in [(0, 0), (0, 1), (1, 2)]:
        assert scores[layer, head].item() == pytest.approx(1.0, abs=1e-6)
    for layer, head in [(0, 2), (0, 3), (1, 0), (1, 1), (1, 3)]:
        assert scores[layer, head].item() < 0.9
    # A 3 x 3 head is inside any larger window too; a smaller window takes some weight out.
    assert scores_of(model, images_for("vit"), window=(5, 3))[0, 0].item() == pytest.approx(1.0, abs=1e-6)
    assert scores_of(model, images_for("vit"), window=1)[0, 0].item() < 0.9


def test_masked_heads_with_global_prefix_lose_what_goes_to_the_class_token():
    model = attnmask.apply(make_timm("vit"), heads=[0], window=3)
    scores = scores_of(model, images_for("vit"))
    assert 0.0 < scores[0, 0].item() < 1.0
    assert scores[0, 0].item() > scores[0, 1:].max().item()


def zero_queries_timm(model) -> None:
    """q = 0 in every layer: every logit is 0, so attention is uniform."""
    with torch.no_grad():
        for block in model.blocks:
            dim = block.attn.qkv.in_features
            block.attn.qkv.weight[:dim] = 0
            block.attn.qkv.bias[:dim] = 0


@pytest.mark.parametrize("window", [3, (3, 5), 1])
def test_uniform_attention_scores_window_size_over_tokens(window):
    model = make_timm("vit")
    zero_queries_timm(model)
    scores = scores_of(model, images_for("vit"), window)
    expected = uniform_expectation((5, 7), attnmask.spec.normalize_window(window), 1)
    torch.testing.assert_close(scores, torch.full((2, 4), expected, dtype=torch.float64), rtol=0, atol=1e-6)


def test_uniform_attention_on_dropped_patches_counts_the_kept_ones():
    transformers = pytest.importorskip("transformers")
    from cases_hf import SMALL

    torch.manual_seed(0)
    model = transformers.ViTMAEModel(transformers.ViTMAEConfig(**SMALL, mask_ratio=0.5)).eval()
    zeroed = []
    with torch.no_grad():
        for name, param in model.named_parameters():
            if re.search(r"(query|q_proj)\.(weight|bias)$", name):
                param.zero_()
                zeroed.append(name)
    assert len(zeroed) == 4  # weight and bias of both layers' queries
    images = torch.randn(2, 3, 40, 56, generator=torch.Generator().manual_seed(1))
    noise = torch.rand(2, 35, generator=torch.Generator().manual_seed(2))
    scores = scores_of(model, images, forward=lambda m, x: m(x, noise=noise, interpolate_pos_encoding=True))
    kept = torch.argsort(noise, dim=1)[:, : int(35 * 0.5)]
    expected = sum(uniform_expectation((5, 7), (3, 3), 1, kept[b].tolist()) for b in range(2)) / 2
    torch.testing.assert_close(scores, torch.full((2, 4), expected, dtype=torch.float64), rtol=0, atol=1e-6)


def test_forced_local_heads_score_one_on_dropped_patches():
    transformers = pytest.importorskip("transformers")
    from cases_hf import SMALL

    torch.manual_seed(0)
    model = transformers.ViTMAEModel(transformers.ViTMAEConfig(**SMALL, mask_ratio=0.5)).eval()
    attnmask.apply(model, heads={0: [1], 1: [0, 2]}, window=3, prefix="isolated")
    images = torch.randn(2, 3, 40, 56, generator=torch.Generator().manual_seed(1))
    # A random subset of patches per sample.
    scores = scores_of(model, images, forward=lambda m, x: m(x, interpolate_pos_encoding=True))
    local = torch.tensor([[False, True, False, False], [True, False, True, False]])
    torch.testing.assert_close(scores[local], torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-6)
    assert bool((scores[~local] < 0.9).all())


def test_uniform_attention_torchvision_vit():
    pytest.importorskip("torchvision")
    from cases_torchvision import build_vit

    model = build_vit(0)
    with torch.no_grad():
        for layer in model.encoder.layers:
            mha = layer.self_attention
            mha.in_proj_weight[: mha.embed_dim] = 0
            mha.in_proj_bias[: mha.embed_dim] = 0
    scores = scores_of(model, torch.randn(3, 3, 40, 40, generator=torch.Generator().manual_seed(1)), 3)
    expected = uniform_expectation((5, 5), (3, 3), 1)
    torch.testing.assert_close(scores, torch.full((2, 4), expected, dtype=torch.float64), rtol=0, atol=1e-6)


def test_batching_and_input_forms_give_the_same_scores():
    model = make_timm("vit")
    images = images_for("vit", batch=5)
    whole = scores_of(model, images, batch_size=32)
    torch.testing.assert_close(scores_of(model, images, batch_size=2), whole, rtol=1e-6, atol=1e-7)
    loader = [(images[:3], torch.zeros(3)), [images[3:], torch.ones(2)]]
    torch.testing.assert_close(scores_of(model, loader), whole, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(scores_of(model, iter([images[:1], images[1:]])), whole, rtol=1e-6, atol=1e-7)


def recorded_cases():
    import cases_hf
    import cases_timm
    import cases_timm_more
    import cases_torchvision

    wanted = {
        "timm-vit-reg4", "timm-eva", "timm-beit", "hf-beit", "hf-vit-mae", "torchvision-vit",
        "timm-swin", "timm-swinv2", "torchvision-swin-v2",
    }
    modules = (cases_timm, cases_timm_more, cases_hf, cases_torchvision)
    return [case for module in modules for case in module.CASES if case.id in wanted]


@pytest.mark.parametrize("mode", ["hard", "soft"])
@pytest.mark.parametrize("case", recorded_cases(), ids=lambda case: case.id)
def test_recorded_forward_is_the_real_forward(case, mode):
    """While recording, the forward runs on the recorded probabilities: its output is the
    model's own (hard or soft masks, host position biases, dropped patches included)."""
    model = case.build(0)
    try:
        attnmask.apply(model, heads={0: [0, 2], 1: "all"}, window=3, mode=mode, backend="reference")
    except NotImplementedError:
        pytest.skip("soft mode is not implemented yet")
    images = case.images(2, 1)
    with torch.no_grad():
        expected = case.forward(model, images)
    seen = []
    scores_of(model, images, forward=lambda m, x: seen.append(case.forward(m, x)))
    torch.testing.assert_close(seen[0], expected, rtol=1e-4, atol=1e-5)


# -- the model is left as it was --------------------------------------------------------------


def run_features(model, images):
    with torch.no_grad():
        return model.forward_features(images)


def test_unpatched_model_is_restored_exactly():
    model = make_timm("vit_dynamic")
    model.train()
    model.blocks[0].eval()  # mixed training flags come back as they were
    flags = [m.training for m in model.modules()]
    before = snapshot(model)
    model.eval()
    out = run_features(model, images_for("vit_dynamic"))
    for m, flag in zip(model.modules(), flags):
        m.training = flag
    scores_of(model, images_for("vit_dynamic"))
    assert [m.training for m in model.modules()] == flags
    assert same_snapshot(before, snapshot(model)) and not attnmask.is_patched(model)
    model.eval()
    assert torch.equal(run_features(model, images_for("vit_dynamic")), out)


def test_patched_model_keeps_its_spec_and_outputs():
    model = attnmask.apply(make_timm("vit"), heads={1: [0, 3]}, window=(3, 5))
    spec, before = attnmask.get_spec(model), snapshot(model)
    out = run_features(model, images_for("vit"))
    scores_of(model, images_for("vit"))
    assert attnmask.get_spec(model) is spec
    assert same_snapshot(before, snapshot(model))
    assert torch.equal(run_features(model, images_for("vit")), out)


def test_hf_model_keeps_its_attention_implementation():
    transformers = pytest.importorskip("transformers")
    from cases_hf import SMALL

    torch.manual_seed(0)
    model = transformers.ViTModel(transformers.ViTConfig(**SMALL), add_pooling_layer=False).eval()
    images = torch.randn(2, 3, 40, 40, generator=torch.Generator().manual_seed(1))
    implementation, before = model.config._attn_implementation, snapshot(model)
    with torch.no_grad():
        out = model(images).last_hidden_state
    scores = scores_of(model, images)
    assert scores.shape == (2, 4) and bool(((scores > 0) & (scores < 1)).all())
    assert model.config._attn_implementation == implementation
    assert same_snapshot(before, snapshot(model))
    with torch.no_grad():
        assert torch.equal(model(images).last_hidden_state, out)


def test_bad_arguments_leave_the_model_untouched():
    model = attnmask.apply(make_timm("vit"), heads=[1], window=3)
    before, spec = snapshot(model), attnmask.get_spec(model)
    images = images_for("vit")
    cases = [
        (dict(window=4), ValueError, "window=4"),
        (dict(window="3"), TypeError, "window='3'"),
        (dict(batch_size=0), ValueError, "batch_size=0"),
        (dict(batch_size=True), ValueError, "batch_size=True"),
        (dict(images=images[0]), ValueError, r"\(N, C, H, W\)"),
        (dict(images="images.png"), TypeError, "images=str"),
        (dict(images=[images, "not a tensor"]), TypeError, "batch 1"),
        (dict(forward=3), TypeError, "forward=3"),
        (dict(forward=lambda m, x: None), RuntimeError, "recorded no attention"),
    ]
    for kwargs, error, fragment in cases:
        arguments = {"images": images, "window": 3, **kwargs}
        with pytest.raises(error, match=fragment):
            attnmask.locality_scores(model, progress=False, **arguments)
        assert attnmask.get_spec(model) is spec
        assert same_snapshot(before, snapshot(model))


def test_progress_bar_and_its_absence(capsys, monkeypatch):
    model = make_timm("vit")
    images = images_for("vit", batch=3)
    attnmask.locality_scores(model, images, batch_size=2, progress=True)
    assert "locality_scores" in capsys.readouterr().err
    attnmask.locality_scores(model, images, batch_size=2, progress=False)
    assert capsys.readouterr().err == ""
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # tqdm not installed: no bar, same scores
    torch.testing.assert_close(attnmask.locality_scores(model, images, progress=True), scores_of(model, images))
    assert "locality_scores" not in capsys.readouterr().err


# -- families ---------------------------------------------------------------------------------


def hf_vit_from_timm(model):
    """A Hugging Face ViT with the weights of a timm ViT (both layouts of transformers 5.x)."""
    transformers = pytest.importorskip("transformers")
    dim, heads = model.embed_dim, model.blocks[0].attn.num_heads
    config = transformers.ViTConfig(
        hidden_size=dim, num_hidden_layers=len(model.blocks), num_attention_heads=heads,
        intermediate_size=model.blocks[0].mlp.fc1.out_features, image_size=(40, 56), patch_size=8,
        layer_norm_eps=1e-6, hidden_act="gelu", qkv_bias=True,
    )
    hf = transformers.ViTModel(config, add_pooling_layer=False).eval()
    source = model.state_dict()
    target = {}
    for name in hf.state_dict():
        if name.startswith("layernorm."):
            target[name] = source["norm." + name.split(".")[-1]]
            continue
        if not name.startswith("encoder.layer") and not name.startswith("layers."):
            key = {
                "embeddings.cls_token": "cls_token",
                "embeddings.position_embeddings": "pos_embed",
                "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
                "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
            }[name]
            target[name] = source[key]
            continue
        layer = int(re.search(r"\.(\d+)\.", name).group(1))
        kind = name.split(".")[-1]
        block = f"blocks.{layer}."
        qkv_part = next((i for i, parts in enumerate((("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")))
                         if any(f".{p}." in name for p in parts)), None)
        if qkv_part is not None:
            target[name] = source[block + "attn.qkv." + kind][qkv_part * dim : (qkv_part + 1) * dim]
        elif "attention.output.dense" in name or ".o_proj." in name:
            target[name] = source[block + "attn.proj." + kind]
        elif "layernorm_before" in name:
            target[name] = source[block + "norm1." + kind]
        elif "layernorm_after" in name:
            target[name] = source[block + "norm2." + kind]
        elif "intermediate.dense" in name or ".fc1." in name:
            target[name] = source[block + "mlp.fc1." + kind]
        elif "output.dense" in name or ".fc2." in name:
            target[name] = source[block + "mlp.fc2." + kind]
        else:
            raise AssertionError(f"no timm weight for {name}")
    hf.load_state_dict(target)
    return hf


def test_timm_and_hf_vit_with_the_same_weights_score_the_same():
    model = make_timm("vit")
    hf = hf_vit_from_timm(model)
    images = images_for("vit")
    with torch.no_grad():
        torch.testing.assert_close(hf(images).last_hidden_state[:, :, :8], model.forward_features(images)[:, :, :8],
                                   rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(scores_of(hf, images), scores_of(model, images), rtol=1e-5, atol=1e-6)
    # Masked the same way, too.
    attnmask.apply(model, heads=[0], window=3)
    attnmask.apply(hf, heads=[0], window=3)
    spec = attnmask.get_spec(hf)
    torch.testing.assert_close(scores_of(hf, images, 5), scores_of(model, images, 5), rtol=1e-5, atol=1e-6)
    assert attnmask.get_spec(hf) is spec and hf.config._attn_implementation == "attnmask"


def family_cases():
    import cases_hf
    import cases_timm
    import cases_timm_more
    import cases_torchvision

    return [
        pytest.param(case, id=case.id)
        for module in (cases_timm, cases_timm_more, cases_hf, cases_torchvision)
        for case in module.CASES
    ]


@pytest.mark.parametrize("case", family_cases())
def test_every_family_scores_or_refuses(case):
    model = case.build(0)
    images = case.images(2, 1)
    family = attnmask.describe(model).family
    if not case.kernel_backed:
        with pytest.raises(TypeError, match=rf"does not support {re.escape(family)} models.*Supported families: timm\.swin, timm\.beit.*torchvision\.swin"):
            scores_of(model, images)
        return
    before = snapshot(model)
    scores = scores_of(model, images, forward=lambda m, x: case.forward(m, x))
    num_heads = [site.num_heads for site in find_adapter(model).sites(model)]
    assert scores.shape == (len(num_heads), max(num_heads))
    for layer, heads in enumerate(num_heads):
        row = scores[layer]
        assert bool(((row[:heads] > 0) & (row[:heads] <= 1)).all()), (layer, row)
        assert bool(row[heads:].isnan().all())
    assert same_snapshot(before, snapshot(model))


def test_host_attention_families_are_the_adapters_without_kernels():
    from attnmask.adapters import REGISTRY, load

    for entry in REGISTRY:
        pytest.importorskip(entry.host)
        assert hasattr(load(entry), "backend_label") == (entry.name in HOST_ATTENTION_FAMILIES), entry.name


# -- suggest_heads ----------------------------------------------------------------------------

TABLE = [
    [0.90, 0.80, 0.05],  # probe local: all heads but the one that is ~global
    [0.50, 0.90, 0.20],  # probe halfway: one head
    [0.05, 0.60, 0.30],  # probe global: none
    [0.70, 0.70, 0.70],  # exactly `high`: all
    [0.10, 0.95, float("nan")],  # exactly `low`, a layer with 2 heads
]


def test_suggest_heads_follows_the_paper_rule():
    assert attnmask.suggest_heads(torch.tensor(TABLE)) == {0: [0, 1], 1: [0], 3: [0, 1, 2], 4: [0]}
    assert attnmask.suggest_heads(TABLE, probe_head=1) == {0: [0, 1], 1: [0, 1, 2], 2: [1], 3: [0, 1, 2], 4: [0, 1]}
    # None: each layer's most local head decides, and is the one kept in halfway layers.
    assert attnmask.suggest_heads(TABLE, probe_head=None) == {0: [0, 1], 1: [0, 1, 2], 2: [1], 3: [0, 1, 2], 4: [0, 1]}
    assert attnmask.suggest_heads(TABLE, high=0.95, low=0.55) == {0: [0], 3: [0]}
    assert attnmask.suggest_heads([[0.01, 0.99]], probe_head=None, high=0.99, low=0.0) == {0: [0, 1]}


@pytest.mark.parametrize(
    "kwargs, error, fragment",
    [
        (dict(scores=[0.5, 0.5]), ValueError, "shape"),
        (dict(scores=[[]]), ValueError, "shape"),
        (dict(scores="high"), TypeError, "scores=str"),
        (dict(low=0.7, high=0.7), ValueError, "0 <= low < high <= 1"),
        (dict(high=1.5), ValueError, "high=1.5"),
        (dict(low=-0.1), ValueError, "low=-0.1"),
        (dict(low="0.1"), TypeError, "low='0.1'"),
        (dict(probe_head=3), ValueError, r"probe_head=3 .*0\.\.2"),
        (dict(probe_head=True), ValueError, "probe_head=True"),
        (dict(probe_head=2), ValueError, "layer 4 has no score for head 2"),
    ],
)
def test_suggest_heads_refuses_bad_arguments(kwargs, error, fragment):
    kwargs = {"scores": TABLE, **kwargs}
    with pytest.raises(error, match=fragment):
        attnmask.suggest_heads(kwargs.pop("scores"), **kwargs)


def test_suggested_heads_are_accepted_by_apply():
    model = attnmask.apply(make_timm("vit"), heads={0: "all", 1: [0]}, window=3, prefix="isolated")
    scores = scores_of(model, images_for("vit"))
    heads = attnmask.suggest_heads(scores, high=0.99, low=0.5)
    assert heads == {0: [0, 1, 2, 3], 1: [0]}
    attnmask.apply(model, heads=heads, window=3)
    assert attnmask.get_spec(model).heads == ((0, 1, 2, 3), (0,))
    assert attnmask.suggest_heads(torch.tensor([[0.3, 0.2, 0.1, 0.9], [0.8, 0.9, 0.05, 0.2]])) == {0: [0], 1: [0, 1, 3]}
    attnmask.apply(model, heads=attnmask.suggest_heads(torch.tensor([[0.3, 0.2, 0.1, 0.9], [0.8, 0.9, 0.05, 0.2]])))


def test_reference_kernel_helper_agrees_with_naive_attention():
    # The recording kernel's probabilities, applied to v, match helpers.naive_attention.
    q, k, v = qkv(num_heads=2, tokens=10)
    mask = LocalMask(grid=(3, 3), window=(3, 3), prefix_tokens=1, num_heads=2, heads=(0,))
    from helpers import brute_force_mask

    allowed = brute_force_mask((3, 3), (3, 3), 1, 2, (0,))
    torch.testing.assert_close(
        attention_probs(q, k, mask).double() @ v.double(), naive_attention(q, k, v, allowed), rtol=1e-5, atol=1e-6
    )


def test_compiled_wrapper_is_scored_through_the_model_inside():
    """``torch.compile(model)`` keeps the spec on the model inside: scoring the wrapper must
    see the masks and put them back (not strip them as if the model were unpatched)."""
    model = attnmask.apply(make_timm("vit", depth=2), heads=1, window=3, backend="sdpa")
    images = images_for("vit")
    expected = attnmask.locality_scores(model, images, window=3, progress=False)
    compiled = torch.compile(model)
    assert attnmask.get_spec(compiled) is attnmask.get_spec(model) and attnmask.describe(compiled).patched
    before = snapshot(model)
    scores = attnmask.locality_scores(compiled, images, window=3, progress=False)
    torch.testing.assert_close(scores, expected, equal_nan=True)
    assert same_snapshot(snapshot(model), before)
    assert {type(m).__name__ for m in model.modules()} & {"MaskedAttention"}


def test_unsupported_model_error_says_which_families_locality_scores_refuses():
    with pytest.raises(TypeError, match=r"locality_scores does not support .*host code: timm\.cait\)") as error:
        attnmask.locality_scores(torch.nn.Linear(2, 2), torch.zeros(1, 3, 8, 8), progress=False)
    assert "swin" not in str(error.value).split("locality_scores does not support")[1]


def swin_cases():
    import cases_timm_more

    cases = [case for case in cases_timm_more.CASES if case.family == "timm.swin"]
    try:
        import cases_torchvision
    except pytest.skip.Exception:  # torchvision is not installed
        return cases
    return cases + [case for case in cases_torchvision.CASES if case.family == "torchvision.swin"]


def uniform_first_layer(model) -> None:
    """q = 0 and a constant position bias in the first (unshifted) window attention of a Swin:
    its attention is uniform over the attention window's tokens."""
    attn = next(m for name, m in model.named_modules() if name.endswith("attn") and hasattr(m, "window_size"))
    dim = attn.qkv.in_features
    with torch.no_grad():
        attn.qkv.weight[:dim] = 0
        if attn.qkv.bias is not None:
            attn.qkv.bias[:dim] = 0
        if getattr(attn, "q_bias", None) is not None:
            attn.q_bias.zero_()
        if hasattr(attn, "cpb_mlp"):
            attn.cpb_mlp[-1].weight.zero_()  # 16 * sigmoid(0) = 8 everywhere
        else:
            attn.relative_position_bias_table.zero_()


@pytest.mark.parametrize("case", swin_cases(), ids=lambda case: case.id)
def test_swin_families_are_scored_on_the_attention_window(case):
    """Swin's attention runs through the kernels, so it is recorded: the grid is each attention
    window's own (4 x 4 here). Forced-local heads score 1 (shifted layer 1 included), uniform
    attention scores mean |W(n)| / N on the window, and the model is left as it was."""
    model = case.build(0)
    images = case.images(2, 1)
    forward = lambda m, x: case.forward(m, x)  # noqa: E731
    uniform_first_layer(model)
    before = snapshot(model)
    scores = scores_of(model, images, forward=forward)
    assert scores.shape == (4, 8 if case.family == "timm.swin" else 4)
    expected = uniform_expectation((4, 4), (3, 3), 0)
    torch.testing.assert_close(scores[0, :4], torch.full((4,), expected, dtype=torch.float64), rtol=0, atol=1e-6)
    assert same_snapshot(before, snapshot(model)) and not attnmask.is_patched(model)

    attnmask.apply(model, heads={0: [1, 3], 1: [0, 2]}, window=3)
    spec = attnmask.get_spec(model)
    scores = scores_of(model, images, forward=forward)
    for layer, head in [(0, 1), (0, 3), (1, 0), (1, 2)]:
        assert scores[layer, head].item() == pytest.approx(1.0, abs=1e-6), (layer, head)
    for layer, head in [(1, 1), (1, 3)]:
        assert scores[layer, head].item() < 0.99, (layer, head)
    assert attnmask.get_spec(model) == spec
