"""``mode="soft"`` (the paper's Eq. 2): a masked head's out-of-window logits are set to 0, not
``-inf``, before the host's own mask or bias is added and the softmax taken.

Every backend is checked against :func:`soft64`, a float64 definition written here from the
formula (``M * (q k^T * scale) + host``, the mask ``M`` from ``helpers.brute_force_mask``),
independent of ``attnmask.masks``; then whole models (timm, Hugging Face, torchvision, CaiT;
the Swin families of all three hosts, whose position bias and shift mask reach the kernel as the
host mask) and the saved-folder round trip.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import brute_force_mask, naive_attention, same_snapshot, snapshot
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import geometries

import attnmask
from attnmask.kernels import AUTO_TABLE, KERNELS, auto_choice, choose_backend, flex_attention, sdpa_attention
from attnmask.kernels.flex import FLEX_VARIANTS
from attnmask.masks import LocalMask, mask_logits
from attnmask.spec import MaskSpec

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")


def qkv(batch, num_heads, num_tokens, dim, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, num_heads, num_tokens, dim, generator=g, dtype=dtype) for _ in range(3)]


def soft64(q, k, v, allowed, host=None, scale=None):
    """Eq. 2 from scratch in float64: ``softmax(M * (q k^T * scale) + host) v``.

    ``allowed`` is the binary matrix ``M`` (broadcastable to ``(B, H, N, N)``); ``host`` a boolean
    (True = attend) or additive mask.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double()) * scale
    logits = allowed.double() * logits  # M multiplies the logits
    if host is not None:
        if host.dtype == torch.bool:
            host = torch.zeros(host.shape, dtype=torch.float64).masked_fill(~host, float("-inf"))
        logits = logits + host.double()
    weights = torch.exp(logits - logits.amax(-1, keepdim=True))
    weights = weights / weights.sum(-1, keepdim=True)
    return torch.einsum("bhqk,bhkd->bhqd", weights, v.double())


def host_mask(kind: str, num_heads: int, n: int, seed: int):
    """A host mask of one of the shapes hosts pass (every row keeps at least its diagonal)."""
    g = torch.Generator().manual_seed(seed)
    eye = torch.eye(n, dtype=torch.bool)
    if kind == "none":
        return None
    if kind == "bool":
        return (torch.rand(n, n, generator=g) > 0.3) | eye
    if kind == "bool_per_head":
        return (torch.rand(1, num_heads, n, n, generator=g) > 0.3) | eye
    if kind == "float_per_head":  # a relative position bias
        return torch.randn(num_heads, n, n, generator=g, dtype=torch.float64)
    if kind == "float_per_batch":
        return torch.randn(2, 1, n, n, generator=g, dtype=torch.float64)
    return torch.randn(2, 1, 1, n, generator=g, dtype=torch.float64)  # a (B, 1, 1, N) key bias


HOSTS = ["none", "bool", "bool_per_head", "float_per_head", "float_per_batch", "float_per_key"]


# -- kernels against the float64 definition -----------------------------------------------------------------


@pytest.mark.parametrize("backend", sorted(KERNELS))
@settings(max_examples=15)
@given(geometry=geometries(), host=st.sampled_from(HOSTS), variant=st.sampled_from(sorted(FLEX_VARIANTS)), seed=st.integers(0, 1000))
def test_every_backend_matches_float64_soft_definition(backend, geometry, host, variant, seed):
    """Any geometry (prefix tokens, both prefix policies, any heads), any host mask; flex in
    every variant (they are ignored in soft mode) on its eager float64 path."""
    grid, window, prefix_tokens, num_heads, heads, prefix = geometry
    mask = LocalMask(grid, window, prefix_tokens, num_heads, heads, prefix, mode="soft")
    n = mask.num_tokens
    q, k, v = qkv(2, num_heads, n, 8, seed=seed)
    attn_mask = host_mask(host, num_heads, n, seed + 1)
    expected = soft64(q, k, v, brute_force_mask(grid, window, prefix_tokens, num_heads, heads, prefix), attn_mask)
    options = FLEX_VARIANTS[variant] if backend == "flex" else {}
    out = KERNELS[backend](q, k, v, mask, attn_mask=attn_mask, **options)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", ["sdpa", "flex", "reference", "auto"])
def test_per_sample_positions_soft(backend):
    """ViTMAE-style subsets: the mask is read at each sample's positions."""
    grid, prefix_tokens = (6, 7), 1
    g = torch.Generator().manual_seed(0)
    kept = torch.stack([torch.randperm(42, generator=g)[:11] for _ in range(3)])
    positions = torch.cat([torch.zeros(3, 1, dtype=torch.long), kept + prefix_tokens], dim=1)
    mask = LocalMask(grid, (3, 3), prefix_tokens, 2, (1,), "isolated", positions=positions, mode="soft")
    q, k, v = qkv(3, 2, 12, 8)
    full = brute_force_mask(grid, (3, 3), prefix_tokens, 2, (1,), "isolated")
    allowed = full[:, positions[:, :, None], positions[:, None, :]].transpose(0, 1)  # (B, H, n, n)
    expected = soft64(q, k, v, allowed)
    options = {"compiled": False} if backend == "flex" else {}
    torch.testing.assert_close(KERNELS[backend](q, k, v, mask, **options), expected, rtol=1e-10, atol=1e-10)


def compiled_case(prefix: str, host: str, prefix_tokens: int = 2, variant: str = "flex-b128-rows"):
    mask = LocalMask((6, 7), (3, 5), prefix_tokens, 4, (0, 2), prefix, mode="soft")
    n = mask.num_tokens
    q, k, v = qkv(2, 4, n, 16, dtype=torch.float32, seed=5)
    attn_mask = host_mask(host, 4, n, 6)
    if attn_mask is not None and attn_mask.is_floating_point():
        attn_mask = attn_mask.float()
    with torch.no_grad():
        out = flex_attention(q, k, v, mask, attn_mask=attn_mask, **FLEX_VARIANTS[variant])
    allowed = brute_force_mask((6, 7), (3, 5), prefix_tokens, 4, (0, 2), prefix)
    torch.testing.assert_close(out.double(), soft64(q, k, v, allowed, attn_mask), rtol=2e-5, atol=2e-5)


def test_compiled_flex_soft_float32():
    """The compiled CPU FlexAttention with the soft score_mod composed with a host bias."""
    compiled_case("global", "float_per_head")


@pytest.mark.slow
@pytest.mark.parametrize(
    "prefix, host, prefix_tokens, variant",
    [("isolated", "bool", 1, "flex-b64-tiles"), ("global", "float_per_key", 0, "flex-b64-rows"), ("isolated", "none", 3, "flex-b128-tiles")],
)
def test_compiled_flex_soft_float32_more(prefix, host, prefix_tokens, variant):
    compiled_case(prefix, host, prefix_tokens, variant)


def test_half_precision_soft_is_computed_in_float32():
    mask = LocalMask((5, 6), (3, 3), 1, 4, (0, 1, 3), mode="soft")
    q, k, v = qkv(2, 4, mask.num_tokens, 16, dtype=torch.bfloat16, seed=2)
    out = sdpa_attention(q, k, v, mask)
    assert out.dtype == torch.bfloat16
    expected = soft64(q, k, v, brute_force_mask((5, 6), (3, 3), 1, 4, (0, 1, 3)))
    torch.testing.assert_close(out.double(), expected, rtol=2e-2, atol=2e-2)


def test_global_heads_bit_for_bit_and_identity_in_soft_mode():
    """Soft mode changes masked heads only; a mask that restricts nothing is plain attention."""
    mask = LocalMask((6, 5), (3, 3), 1, 4, (1, 2), mode="soft")
    q, k, v = qkv(3, 4, mask.num_tokens, 16, dtype=torch.float32)
    plain = F.scaled_dot_product_attention(q, k, v)
    out = sdpa_attention(q, k, v, mask)
    assert torch.equal(out[:, 0], plain[:, 0]) and torch.equal(out[:, 3], plain[:, 3])
    assert not torch.allclose(out[:, 1], plain[:, 1], atol=1e-4)
    for identity in (LocalMask((4, 3), (7, 5), 2, 4, (0, 1, 2, 3), mode="soft"), LocalMask((4, 3), (3, 3), 2, 4, (), mode="soft")):
        q, k, v = qkv(2, 4, identity.num_tokens, 8, dtype=torch.float32)
        for backend in ("sdpa", "flex", "auto"):
            assert torch.equal(KERNELS[backend](q, k, v, identity), F.scaled_dot_product_attention(q, k, v))


@pytest.mark.parametrize("backend", ["sdpa", "flex", "reference"])
def test_soft_leaks_far_values_not_far_keys(backend):
    """Soft: an out-of-window key's logit is 0 whatever the key, but its value still gets weight
    e^0, so a masked head's output depends on far values. Hard: on neither."""
    grid, window = (5, 5), (3, 3)
    query, far = 1 + 0, 1 + 24  # patch (0, 0) and patch (4, 4)
    options = {"compiled": False} if backend == "flex" else {}
    q, k, v = qkv(1, 2, 26, 8, seed=7)
    changed = {}
    for name, which in (("k", 1), ("v", 2)):
        tensors = [t.clone() for t in (q, k, v)]
        tensors[which][:, :, far] += 3.0
        changed[name] = tensors
    for mode in ("hard", "soft"):
        mask = LocalMask(grid, window, 1, 2, (0,), mode=mode)
        base = KERNELS[backend](q, k, v, mask, **options)[0, 0, query]
        far_k = KERNELS[backend](*changed["k"], mask, **options)[0, 0, query]
        far_v = KERNELS[backend](*changed["v"], mask, **options)[0, 0, query]
        torch.testing.assert_close(far_k, base, rtol=0, atol=1e-12)
        if mode == "hard":
            torch.testing.assert_close(far_v, base, rtol=0, atol=1e-12)
        else:
            assert (far_v - base).abs().max() > 1e-3
    soft = KERNELS[backend](q, k, v, LocalMask(grid, window, 1, 2, (0,), mode="soft"), **options)
    hard = KERNELS[backend](q, k, v, LocalMask(grid, window, 1, 2, (0,), mode="hard"), **options)
    assert not torch.allclose(soft[:, 0], hard[:, 0], atol=1e-3)
    torch.testing.assert_close(soft[:, 1], hard[:, 1], rtol=0, atol=1e-12)  # the global head


@pytest.mark.parametrize("heads", [(0,), (0, 1)])
def test_sdpa_soft_gradcheck(heads):
    """Backward of the explicit soft path (split heads and all heads masked), float64."""
    mask = LocalMask((2, 3), (3, 1), 1, 2, heads, mode="soft")
    q, k, v = (t.requires_grad_() for t in qkv(1, 2, mask.num_tokens, 3, seed=3))
    bias = torch.randn(2, mask.num_tokens, mask.num_tokens, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    assert torch.autograd.gradcheck(lambda q, k, v: sdpa_attention(q, k, v, mask, attn_mask=bias), (q, k, v), fast_mode=True)


@pytest.mark.parametrize("mode", ["soft", "hard"])
@pytest.mark.parametrize("heads", [(0, 2, 3), (1, 3), (0, 1)])
def test_sdpa_gradients_match_float64_definition(mode, heads):
    """Also hard mode: masked heads that are not one run of indices, beside global heads that
    are, used to fail in backward (an in-place write autograd rejected)."""
    mask = LocalMask((4, 5), (3, 3), 1, 4, heads, "isolated", mode=mode)
    allowed = brute_force_mask((4, 5), (3, 3), 1, 4, heads, "isolated")
    leaves = [t.requires_grad_() for t in qkv(2, 4, mask.num_tokens, 8, dtype=torch.float32, seed=9)]
    sdpa_attention(*leaves, mask).square().sum().backward()
    reference = [t.detach().double().requires_grad_() for t in leaves]
    definition = soft64 if mode == "soft" else naive_attention
    definition(*reference, allowed).square().sum().backward()
    for ours, theirs in zip(leaves, reference):
        torch.testing.assert_close(ours.grad.double(), theirs.grad, rtol=1e-4, atol=1e-4)


def test_sdpa_soft_dropout_trains():
    mask = LocalMask((4, 4), (3, 3), 1, 4, (0, 1), mode="soft")
    leaves = [t.requires_grad_() for t in qkv(2, 4, mask.num_tokens, 8, dtype=torch.float32)]
    torch.manual_seed(0)
    dropped = sdpa_attention(*leaves, mask, dropout_p=0.5)
    dropped.sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in leaves)
    assert not torch.allclose(dropped[:, :2], sdpa_attention(*leaves, mask)[:, :2])


def test_auto_runs_soft_where_it_was_measured():
    """Soft mode: blocked where it measured faster (CPU fp32 from 4097 tokens), SDPA elsewhere."""
    bf16 = torch.bfloat16
    assert choose_backend("cpu", torch.float32, 4097, 0.5, False, "soft") == "blocked"
    assert choose_backend("cpu", torch.float32, 4097, 0.5, False, "soft", host_mask=True) == "sdpa"
    assert choose_backend("cpu", torch.float32, 2305, 0.5, False, "soft") == "sdpa"
    assert choose_backend("cuda", bf16, 4097, 1.0, False, "soft") == "sdpa"
    assert all(row.backend != "flex" for row in AUTO_TABLE if row.modes and "soft" in row.modes)
    q = torch.zeros(1, 2, 1 + 64 * 64, 8)
    for mode, backend in (("hard", "blocked"), ("soft", "blocked")):
        assert auto_choice(q, LocalMask((64, 64), (7, 7), 1, 2, (0, 1), mode=mode)) == backend
    q = torch.zeros(1, 2, 1 + 40 * 40, 8)
    for mode, backend in (("hard", "blocked"), ("soft", "sdpa")):
        assert auto_choice(q, LocalMask((40, 40), (7, 7), 1, 2, (0, 1), mode=mode)) == backend


def test_mask_logits_honours_mode():
    logits = torch.randn(2, 3, 10, 10)
    allowed = brute_force_mask((3, 3), (3, 3), 1, 3, (0, 2))
    soft = mask_logits(logits, LocalMask((3, 3), (3, 3), 1, 3, (0, 2), mode="soft"))
    torch.testing.assert_close(soft, logits * allowed, rtol=0, atol=0)
    hard = mask_logits(logits, LocalMask((3, 3), (3, 3), 1, 3, (0, 2)))
    assert torch.equal(hard, logits.masked_fill(~allowed, float("-inf")))


# -- whole models ----------------------------------------------------------------------------------------------


def family_cases() -> dict:
    import cases_hf
    import cases_timm
    import cases_timm_more

    cases = cases_timm.CASES + cases_timm_more.CASES + cases_hf.CASES
    try:
        import cases_torchvision
    except pytest.skip.Exception:  # torchvision is not installed
        pass
    else:
        cases = cases + cases_torchvision.CASES
    return {case.id: case for case in cases}


SWIN_CASES = ["hf-swin", "timm-swin", "timm-swinv2", "torchvision-swin", "torchvision-swin-v2"]
MODEL_CASES = ["timm-vit", "timm-vit-reg4", "timm-siglip", "timm-beit", "hf-vit", "hf-beit", "hf-vit-mae", *SWIN_CASES]


def sharp_swin_logits(model) -> None:
    """Swin logits of order 1: at init ``q k^T * scale`` is ~0 in timm's and torchvision's Swin
    v1 (qkv weights of std 0.02 on 16 channels), where soft and hard barely differ."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("attn.qkv.weight"):
                param.normal_(std=0.3)


@pytest.mark.parametrize("case_id", MODEL_CASES)
def test_soft_model_matches_reference_backend(case_id):
    """``backend="auto"`` (SDPA's explicit soft path) equals the float64 reference backend, and
    soft differs from hard. Every Swin family accepts soft: its bias and shift mask arrive as
    the kernel's host mask."""
    case = family_cases().get(case_id)
    if case is None:
        pytest.skip(f"{case_id}: its host library is not installed")
    x = case.images(2, 1)
    model = case.build(0)
    if case_id in SWIN_CASES[1:]:
        sharp_swin_logits(model)
    heads = 1 if case_id == "hf-swin" else [0, 2]
    soft = attnmask.apply(copy.deepcopy(model), heads=heads, window=3, mode="soft")
    reference = attnmask.apply(copy.deepcopy(model), heads=heads, window=3, mode="soft", backend="reference")
    hard = attnmask.apply(copy.deepcopy(model), heads=heads, window=3)
    assert attnmask.get_spec(soft).mode == "soft" and attnmask.describe(soft).mode == "soft"
    with torch.no_grad():
        out, expected, out_hard = (case.forward(m, x) for m in (soft, reference, hard))
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(out, out_hard, atol=1e-3)


def record_kernel_calls(monkeypatch, name: str) -> list:
    calls = []
    kernel = KERNELS[name]

    def recorder(q, k, v, mask, **kwargs):
        out = kernel(q, k, v, mask, **kwargs)
        calls.append((q, k, v, mask, kwargs, out))
        return out

    monkeypatch.setitem(KERNELS, name, recorder)
    return calls


LAYER_CASES = [
    # (case, prefix tokens, heads, the grid a masked layer sees)
    ("hf-vit", 1, (1, 3), (5, 7)),
    ("hf-beit", 1, (1, 3), (5, 7)),
    ("timm-beit", 1, (1, 3), (5, 7)),
    ("timm-vit-reg4", 5, (1, 3), (5, 7)),
    ("hf-swin", 0, (0,), (4, 4)),  # one 4 x 4 attention window at a time
    ("timm-swin", 0, (0, 2), (4, 4)),
    ("timm-swinv2", 0, (0, 2), (4, 4)),
    ("torchvision-swin", 0, (0, 2), (4, 4)),
    ("torchvision-swin-v2", 0, (0, 2), (4, 4)),
]


@pytest.mark.parametrize("case_id, prefix_tokens, heads, grid", LAYER_CASES)
@pytest.mark.parametrize("prefix", ["global", "isolated"])
def test_soft_model_layers_against_float64_definition(monkeypatch, case_id, prefix_tokens, heads, grid, prefix):
    """What each masked layer computes, from what it hands the kernel (BEiT and Swin: the
    relative position bias, and Swin's shift mask, as the host mask, added after Eq. 2's zeros)."""
    case = family_cases().get(case_id)
    if case is None:
        pytest.skip(f"{case_id}: its host library is not installed")
    model = attnmask.apply(case.build(0), heads=list(heads), window=3, prefix=prefix, mode="soft", backend="sdpa")
    calls = record_kernel_calls(monkeypatch, "sdpa")
    with torch.no_grad():
        case.forward(model, case.images(2, 1))
    assert len(calls) == len(attnmask.get_spec(model).layers)
    for q, k, v, mask, kwargs, out in calls:
        allowed = brute_force_mask(grid, (3, 3), prefix_tokens, q.shape[1], heads, prefix)
        host = kwargs.get("attn_mask")
        assert (host is not None) == (case_id != "hf-vit" and "reg4" not in case_id)
        expected = soft64(q, k, v, allowed, host, kwargs.get("scale"))
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prefix", ["global", "isolated"])
def test_timm_vit_soft_attention_from_weights(prefix):
    """The first attention layer of a timm ViT, recomputed in float64 from its weights."""
    case = family_cases()["timm-deit-distilled"]
    model = attnmask.apply(case.build(0), heads="all", window=(3, 5), prefix=prefix, mode="soft")
    attn = model.blocks[0].attn
    seen = {}
    handle = attn.register_forward_hook(lambda module, args, out: seen.update(x=args[0], out=out))
    with torch.no_grad():
        case.forward(model, case.images(2, 1))
    handle.remove()
    x = seen["x"].double()
    B, N, C = x.shape
    qkv64 = F.linear(x, attn.qkv.weight.double(), attn.qkv.bias.double()).reshape(B, N, 3, 4, C // 4).permute(2, 0, 3, 1, 4)
    allowed = brute_force_mask((5, 7), (3, 5), 2, 4, (0, 1, 2, 3), prefix)
    heads = soft64(qkv64[0], qkv64[1], qkv64[2], allowed).transpose(1, 2).reshape(B, N, C)
    expected = F.linear(heads, attn.proj.weight.double(), attn.proj.bias.double())
    torch.testing.assert_close(seen["out"].double(), expected, rtol=1e-5, atol=1e-5)


def test_soft_model_trains_like_the_reference():
    """Gradients of a soft timm ViT (auto: SDPA's explicit path) equal the float64 reference's."""
    case = family_cases()["timm-vit"]
    model = case.build(0)
    x = case.images(2, 1)
    grads = []
    for backend in ("auto", "reference"):
        patched = attnmask.apply(copy.deepcopy(model).train(), heads=2, window=3, mode="soft", backend=backend)
        patched.forward_features(x).square().mean().backward()
        grads.append({n: p.grad for n, p in patched.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and "blocks.0.attn.qkv.weight" in grads[0]
    for name, grad in grads[0].items():
        torch.testing.assert_close(grad, grads[1][name], rtol=1e-3, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_soft_model_compiles_without_graph_breaks(backend):
    case = family_cases()["timm-vit"]
    model = attnmask.apply(case.build(0), heads=[0, 3], window=3, mode="soft", backend=backend)
    x = case.images(2, 1)
    with torch.no_grad():
        eager = model.forward_features(x)
        compiled = torch.compile(model.forward_features, fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


def cait_soft64(attn, x, allowed):
    """CaiT's talking-heads attention in float64 with Eq. 2 on the head-mixed logits."""
    B, N, C = x.shape
    w = {name: (layer.weight.double(), layer.bias.double()) for name, layer in (("qkv", attn.qkv), ("l", attn.proj_l), ("w", attn.proj_w), ("proj", attn.proj))}
    q, k, v = F.linear(x.double(), *w["qkv"]).reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    logits = F.linear(((q * attn.scale) @ k.transpose(-2, -1)).permute(0, 2, 3, 1), *w["l"]).permute(0, 3, 1, 2)
    weights = (logits * allowed.double()).softmax(dim=-1)
    weights = F.linear(weights.permute(0, 2, 3, 1), *w["w"]).permute(0, 3, 1, 2)
    return F.linear((weights @ v).transpose(1, 2).reshape(B, N, C), *w["proj"])


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_cait_soft_through_mask_logits(backend):
    from cases_timm_more import attention_calls

    case = family_cases()["timm-cait"]
    model = case.build(0)
    with torch.no_grad():  # logits of order 1 (at init they are ~0, where soft changes nothing)
        for block in model.blocks:
            block.attn.qkv.weight.normal_(std=0.3)
            block.attn.proj_l.weight.normal_(std=1.0)
            block.attn.proj_w.weight.normal_(std=1.0)
    attnmask.apply(model, heads=[0, 3], window=3, mode="soft", backend=backend)
    module = model.get_submodule(attnmask.get_spec(model).layers[0])
    (x, _, out), = attention_calls(model, [module], case.images(2, 1))
    allowed = brute_force_mask(case.grid, (3, 3), 0, module.num_heads, (0, 3))
    with torch.no_grad():
        expected = cait_soft64(module, x, allowed)
        unmasked = cait_soft64(module, x, torch.ones_like(allowed))
    size = float(expected.abs().max())  # tolerances relative to the outputs' size
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-5 * size)
    assert (out.double() - unmasked).abs().max() > 1e-3 * size


def swin_models():
    from cases_timm_more import CASES as TIMM_MORE
    from cases_torchvision import build_swin

    timm_swin = next(case for case in TIMM_MORE if case.id == "timm-swin")
    return {"timm.swin": timm_swin.build(0), "torchvision.swin": build_swin(0)}


def test_swin_accepts_soft_and_switches_modes():
    """timm and torchvision Swin used to refuse soft (their mask went on the position bias);
    through the kernel seam they take it, switch between modes, and go back exactly."""
    pytest.importorskip("torchvision")
    for family, model in swin_models().items():
        sharp_swin_logits(model)
        x = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(1))
        forward = model.forward_features if family == "timm.swin" else model
        before = snapshot(model)
        with torch.no_grad():
            expected = forward(x)
        attnmask.apply(model, heads=1, window=3, mode="soft")
        assert attnmask.get_spec(model).mode == "soft" and attnmask.describe(model).family == family
        with torch.no_grad():
            soft = forward(x)
        attnmask.apply(model, heads=1, window=3)  # hard
        assert attnmask.get_spec(model).mode == "hard"
        with torch.no_grad():
            hard = forward(x)
        assert not torch.allclose(soft, hard, atol=1e-3), family
        assert not torch.allclose(soft, expected, atol=1e-3), family
        # A bad mode is still refused, and leaves the patched model as it was.
        patched = snapshot(model)
        with pytest.raises(ValueError, match="mode='medium'"):
            attnmask.apply(model, heads=2, window=5, mode="medium")
        assert same_snapshot(patched, snapshot(model)) and attnmask.get_spec(model).window == (3, 3)
        attnmask.remove(model)
        assert same_snapshot(before, snapshot(model)) and not attnmask.is_patched(model)
        with torch.no_grad():
            assert torch.equal(forward(x), expected), family


def test_spec_and_saved_folders_keep_soft(tmp_path):
    from hub_cases import BY_ID, forward, images

    spec_dict = None
    for case_id in ("timm-vit", "hf-vit"):
        case = BY_ID[case_id]
        model = attnmask.apply(case.build(), heads=2, window=3, mode="soft")
        spec_dict = attnmask.get_spec(model).to_dict()
        assert spec_dict["mode"] == "soft" and MaskSpec.from_dict(spec_dict).mode == "soft"
        x = images(case)
        expected = forward(model, x)
        kwargs = dict(model_args=case.model_args) if case.library == "timm" else {}
        folder = attnmask.save_pretrained(model, tmp_path / case_id, **kwargs)
        loaded = attnmask.from_pretrained(folder).eval()
        assert attnmask.get_spec(loaded).mode == "soft"
        for name, tensor in forward(loaded, x).items():
            torch.testing.assert_close(tensor, expected[name], rtol=0, atol=1e-6)
        hard = attnmask.from_pretrained(folder, mode="hard").eval()
        assert attnmask.get_spec(hard).mode == "hard"
        if case.library == "transformers":  # transformers' own loader re-applies the saved masks
            auto = getattr(transformers, case.auto_class).from_pretrained(str(folder))
            assert attnmask.get_spec(auto).mode == "soft"
    with pytest.raises(ValueError, match="mode='fuzzy' is not accepted"):
        attnmask.from_pretrained(tmp_path / "timm-vit", mode="fuzzy")
