"""Check that masks do what they promise on a given model: the coverage sweep's test.

:func:`check_model` patches a model (the first head of every attention layer masked, a
3 x 3 window), runs it, and checks on the first masked attention call that is recorded:

- **locality**: the masked head gives zero weight to every token outside the query patch's
  window and positive weight inside it (so a patch outside cannot change that head's
  output at the query, and one inside does), while a global head of the same layer still
  attends outside the window;
- **layout** (layers that see the whole image, not host windows): perturbing the image
  pixels under the query patch changes the layer's input most at the token attnmask placed
  there, so the grid, its orientation and the number of prefix tokens were read correctly;
- **remove**: after :func:`attnmask.remove` the model's output and state dict are bit for
  bit the unpatched ones.

Every check is computed from the model's own run (recorded attention weights, hooked
inputs), never from attnmask's layout code alone.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn

from .api import apply, get_spec, remove
from .kernels import record

Forward = Callable[[nn.Module, torch.Tensor], Any]


def first_tensor(out: Any) -> torch.Tensor:
    """The first tensor of a model output (a tensor, a tuple, a ``ModelOutput``)."""
    if isinstance(out, torch.Tensor):
        return out
    items = list(out.values()) if isinstance(out, dict) else list(out) if isinstance(out, (list, tuple)) else []
    for item in items:
        try:
            return first_tensor(item)
        except TypeError:
            continue
    raise TypeError(f"no tensor in the model output {type(out).__name__}")


def _run(model: nn.Module, images: torch.Tensor, forward: Optional[Forward]) -> torch.Tensor:
    torch.manual_seed(0)  # the same random choices (ViTMAE's masking) in every run
    with torch.no_grad():
        return first_tensor(forward(model, images) if forward is not None else model(images)).clone()


def _first_input(store: list):
    def hook(module, args, kwargs):
        for value in list(args) + list(kwargs.values()):
            if isinstance(value, torch.Tensor):
                store.append(value.detach().clone())
                return

    return hook


def check_model(
    model: nn.Module, images: torch.Tensor, *, window: int = 3, forward: Optional[Forward] = None
) -> dict[str, Any]:
    """Patch ``model``, check locality, layout and remove; return a result row.

    Returns:
        ``{"status": "patched" | "refused" | "failed", "family", "layers", "geometry",
        "reason"}``; ``"patched"`` only when every applicable check passed.
    """
    before = _run(model, images, forward)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        apply(model, heads=[0], window=window)
    except (TypeError, ValueError) as error:
        return {"status": "refused", "reason": str(error)}
    spec = get_spec(model)
    row: dict[str, Any] = {"family": spec.family, "layers": len(spec.layers)}
    try:
        row.update(_check_patched(model, images, forward, spec))
    except Exception as error:  # noqa: BLE001 - reported in the row
        row.update(status="failed", reason=f"{type(error).__name__}: {error}")
    finally:
        remove(model)
    after = _run(model, images, forward)
    same_state = state.keys() == model.state_dict().keys() and all(
        torch.equal(state[k], v) for k, v in model.state_dict().items()
    )
    row["remove_identical"] = bool(torch.equal(before, after) and same_state)
    if row.get("status") == "patched" and not row["remove_identical"]:
        row.update(status="failed", reason="remove did not restore the unpatched outputs bit for bit")
    return row


def _check_patched(model: nn.Module, images: torch.Tensor, forward: Optional[Forward], spec) -> dict[str, Any]:
    calls: list = []

    def recorder(probs: torch.Tensor, mask) -> None:
        if not calls:
            calls.append((probs.detach(), mask))

    recorder.accepts_pooled = True  # keys on a coarser grid: a PooledMask

    with record.recording(recorder):
        _run(model, images, forward)
    if not calls:
        return {"status": "failed", "reason": "no masked attention call was recorded"}
    probs, mask = calls[0]
    layer_name = spec.layers[mask.layer] if mask.layer is not None else "?"
    grid, prefix = mask.grid, mask.prefix_tokens
    # Off the diagonal and off centre, so a transposed or mirrored grid would be caught.
    cell = (grid[0] // 4, (3 * grid[1]) // 4)
    position = prefix + cell[0] * grid[1] + cell[1]
    query = position
    if mask.positions is not None:  # a per-sample subset of patches: the kept patch nearest the cell
        kept = mask.positions[0]
        patches = (kept >= prefix).nonzero().flatten()
        if not len(patches):
            return {"status": "failed", "reason": "no patch in the recorded sequence"}
        rows, cols = (kept[patches] - prefix) // grid[1], (kept[patches] - prefix) % grid[1]
        nearest = int(((rows - cell[0]).abs() + (cols - cell[1]).abs()).argmin())
        query = int(patches[nearest])
        cell = (int(rows[nearest]), int(cols[nearest]))
    dense = mask.dense(probs.device)
    allowed = (dense[0] if dense.dim() == 4 else dense)[mask.heads[0], query]
    masked_row = probs[0, mask.heads[0], query]
    windows = probs.shape[0] // images.shape[0]
    geometry = f"{layer_name}: {grid[0]}x{grid[1]} grid, {prefix} prefix tokens" + (f", {windows} windows per image" if windows > 1 else "")
    if getattr(mask, "key_grid", grid) != grid:
        geometry += f", keys pooled to {mask.key_grid[0]}x{mask.key_grid[1]}"
    out: dict[str, Any] = {"geometry": geometry, "checked_layer": layer_name}
    outside = ~allowed
    if not outside.any():
        return dict(out, status="failed", reason=f"the {mask.window} window covers the {grid} grid: nothing to check")
    if masked_row[outside].abs().max() != 0:
        return dict(out, status="failed", reason="a masked head gives weight to a token outside its window")
    layout = mask.positions[0] if mask.positions is not None else torch.arange(allowed.shape[-1], device=allowed.device)
    key_prefix = getattr(mask, "key_prefix", prefix)
    inside = allowed & (layout >= key_prefix)  # patches only: prefix tokens are allowed everywhere
    if getattr(mask, "key_grid", grid) == grid:
        inside[query] = False  # itself (on a pooled key grid, no key is the query)
    if not (masked_row[inside] > 0).any():
        return dict(out, status="failed", reason="a masked head gives no weight to the patches inside its window")
    if mask.global_heads:
        global_row = probs[0, mask.global_heads[0], query]
        if not (global_row[outside] > 0).any():
            return dict(out, status="failed", reason="a global head gives no weight outside the window")
    varies = mask.positions is not None and not bool((mask.positions == mask.positions[:1]).all())
    if windows > 1:
        out["layout"] = "not checked (host windows)"
    elif varies:
        out["layout"] = "not checked (a different subset of patches per sample)"
    else:
        order = mask.positions[0] if mask.positions is not None else None
        out["layout"] = _check_layout(model, images, forward, layer_name, grid, prefix, order)
    if out["layout"].startswith("wrong"):
        return dict(out, status="failed", reason=out["layout"])
    return dict(out, status="patched")


def _per_token(change: torch.Tensor, grid, prefix: int) -> Optional[torch.Tensor]:
    """``(tokens,)`` size of a change of the layer input, in sequence order."""
    if change.dim() == 3 and change.shape[1] == prefix + grid[0] * grid[1]:
        return change[0].sum(-1)
    if change.dim() == 4 and tuple(change.shape[-2:]) == tuple(grid):
        return torch.cat([change.new_zeros(prefix), change[0].sum(0).flatten()])
    if change.dim() == 4 and tuple(change.shape[1:3]) == tuple(grid):
        return torch.cat([change.new_zeros(prefix), change[0].sum(-1).flatten()])
    return None


def _in_layout(per_token: Optional[torch.Tensor], order: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Per-token sizes moved from sequence order to full-layout order."""
    if per_token is None or order is None:
        return per_token
    out = torch.zeros_like(per_token)
    out[order.to(per_token.device)] = per_token
    return out


def _check_layout(model, images, forward, layer_name: str, grid, prefix: int, order: Optional[torch.Tensor] = None) -> str:
    """Perturb the pixels under one grid cell and find the layer input's token that changes
    most: it must be the token attnmask places at that cell, or (when the change spreads over
    several tokens, as after a convolutional stem) a patch at most one cell away.

    The image may cover only part of the grid (a host window padded beyond the image, as in
    SAM's encoder at small sizes): the covered part is found first, by perturbing the whole
    image, and the cell is taken inside it, off centre and off the diagonal. ``order``: each
    sequence token's index in the full layout (prefix and suffix tokens first, then the
    grid), when tokens follow the patches (YOLOS)."""
    module = model.get_submodule(layer_name)
    seen: list[torch.Tensor] = []
    handle = module.register_forward_pre_hook(_first_input(seen), with_kwargs=True)
    generator = torch.Generator().manual_seed(1)
    try:
        _run(model, images, forward)
        _run(model, images + 3 * torch.randn(images.shape, generator=generator).to(images), forward)
        whole = _in_layout(_per_token((seen[1] - seen[0]).abs().double(), grid, prefix), order)
        if whole is None:
            return f"not checked (layer input {tuple(seen[0].shape)})"
        moved = (whole[prefix:] > 0).nonzero().flatten()
        if not len(moved):
            return "wrong: perturbing the image changed no patch token of the layer input"
        covered = (int(moved.max()) // grid[1] + 1, int((moved % grid[1]).max()) + 1)
        cell = (covered[0] // 4, (3 * covered[1]) // 4)
        height, width = images.shape[-2:]
        top, left = cell[0] * height // covered[0], cell[1] * width // covered[1]
        rows = slice(top, max((cell[0] + 1) * height // covered[0], top + 1))
        cols = slice(left, max((cell[1] + 1) * width // covered[1], left + 1))
        perturbed = images.clone()
        noise = torch.randn(perturbed[..., rows, cols].shape, generator=generator).to(images)
        perturbed[..., rows, cols] += 3 * noise
        _run(model, perturbed, forward)
    finally:
        handle.remove()
    per_token = _in_layout(_per_token((seen[2] - seen[0]).abs().double(), grid, prefix), order)
    query = prefix + cell[0] * grid[1] + cell[1]
    token = int(per_token.argmax())
    if token == query:
        return "checked"
    share = float(per_token.max() / per_token.sum().clamp_min(1e-30))
    if token >= prefix and share <= 0.5:
        found = divmod(token - prefix, grid[1])
        if abs(found[0] - cell[0]) <= 1 and abs(found[1] - cell[1]) <= 1:
            return "checked (the change spreads over neighbouring tokens; the largest is one cell away)"
    return f"wrong: the pixels under token {query} changed token {token} most ({share:.0%} of the change)"
