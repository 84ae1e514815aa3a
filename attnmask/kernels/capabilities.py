"""What each kernel supports, and what it was measured to be worth: the vocabulary of ``auto``.

Every kernel module states, in one place, a :class:`Backend`: its name, the function, its
:class:`Capabilities` (which calls it runs natively) and its :class:`Measured` rows (how fast
it was, relative to dense SDPA, where it was measured). ``backend="auto"`` describes each
call as a :class:`Call`, keeps the kernels whose capabilities accept it, and runs the one
whose matching row measured fastest (:mod:`attnmask.kernels.auto`). A kernel without a
matching row is never chosen by ``auto``: measurements, not hopes, decide.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from ..masks import LocalMask


@dataclass(frozen=True)
class Call:
    """The facts about one attention call that decide which kernel may and should run it.

    Attributes:
        device: Device type (``"cpu"``, ``"cuda"``, ...).
        dtype: Dtype of the queries.
        tokens: Sequence length.
        fraction: Fraction of the layer's heads that are masked.
        training: Gradients flow into any of ``q``, ``k``, ``v``.
        mode: ``"hard"`` or ``"soft"``.
        host_mask: The host model passes its own ``attn_mask`` (bias, shift or padding mask).
            Windowed hosts (Swin's window attention) reach kernels this way: a small grid per
            attention window with the host's position bias and shift mask.
        positions: Per-sample token positions (ViTMAE's random masking, patch dropout).
        dropout: Attention dropout is on.
    """

    device: str
    dtype: torch.dtype
    tokens: int
    fraction: float = 1.0
    training: bool = False
    mode: str = "hard"
    host_mask: bool = False
    positions: bool = False
    dropout: bool = False

    @classmethod
    def of(
        cls,
        q: torch.Tensor,
        mask: LocalMask,
        attn_mask: Optional[torch.Tensor] = None,
        dropout_p: float = 0.0,
        k: Optional[torch.Tensor] = None,
        v: Optional[torch.Tensor] = None,
    ) -> "Call":
        """Describe a kernel call. It is training when gradients are enabled and any of
        ``q``, ``k``, ``v`` requires them (e.g. only the value projection trained)."""
        training = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v))
        return cls(
            device=q.device.type,
            dtype=q.dtype,
            tokens=int(q.shape[-2]),
            fraction=len(mask.heads) / mask.num_heads,
            training=training,
            mode=mask.mode,
            host_mask=attn_mask is not None,
            positions=mask.positions is not None,
            dropout=bool(dropout_p),
        )


@dataclass(frozen=True)
class Capabilities:
    """Which calls a kernel runs natively (``None`` = any). A call outside them either
    raises (FlexAttention's missing CPU backward) or falls back to another kernel inside
    (blocked's per-sample positions): ``auto`` never picks the kernel for it.

    Attributes:
        devices: Device types.
        dtypes: Query dtypes.
        modes: Mask modes.
        backward: Device types with a backward pass (``None``: every device).
        host_masks: Combines the host's own ``attn_mask`` with the window.
        host_masks_in_training: ...and trains through it.
        positions: Handles per-sample token positions.
        dropout: Applies attention dropout.
        soft_host_masks: Soft mode with a host mask, natively.
        soft_dropout: Soft mode with dropout, natively.
    """

    devices: Optional[tuple[str, ...]] = None
    dtypes: Optional[tuple[torch.dtype, ...]] = None
    modes: tuple[str, ...] = ("hard", "soft")
    backward: Optional[tuple[str, ...]] = None
    host_masks: bool = True
    host_masks_in_training: bool = True
    positions: bool = True
    dropout: bool = True
    soft_host_masks: bool = True
    soft_dropout: bool = True

    def refusal(self, call: Call) -> Optional[str]:
        """Why this kernel does not run ``call`` natively, or ``None`` if it does."""
        checks = (
            (self.devices is not None and call.device not in self.devices, f"device {call.device!r}"),
            (self.dtypes is not None and call.dtype not in self.dtypes, f"dtype {call.dtype}"),
            (call.mode not in self.modes, f"mode {call.mode!r}"),
            (call.training and self.backward is not None and call.device not in self.backward, f"training on {call.device}"),
            (call.host_mask and not self.host_masks, "a host mask"),
            (call.host_mask and call.training and not self.host_masks_in_training, "training with a host mask"),
            (call.positions and not self.positions, "per-sample positions"),
            (call.dropout and not self.dropout, "dropout"),
            (call.mode == "soft" and call.host_mask and not self.soft_host_masks, "soft mode with a host mask"),
            (call.mode == "soft" and call.dropout and not self.soft_dropout, "soft mode with dropout"),
        )
        reasons = [reason for failed, reason in checks if failed]
        return "; ".join(reasons) if reasons else None


@dataclass(frozen=True)
class Measured:
    """One measurement of a kernel (with options), as a row ``auto`` can rank.

    Conditions are ``None`` for "any". ``speed`` is the measured speed relative to dense
    SDPA on the same tensors in the same process (``dense time / kernel time``; above 1 is
    faster than dense): rows that match a call are ranked by it.

    Attributes:
        backend: Kernel name.
        speed: Measured speed relative to dense SDPA.
        evidence: What was measured, where, and where the result file is.
        device: Device type the row applies to.
        dtypes: Dtypes the row applies to.
        min_tokens: Smallest token count.
        max_tokens: Largest token count (``None``: no limit).
        min_fraction: Smallest masked-head fraction.
        max_fraction: Largest masked-head fraction.
        training: ``True``/``False`` for training/inference only, ``None`` for both.
        modes: Mask modes the row applies to (``None``: both).
        options: Keyword arguments for the kernel (block sizes and the like).
    """

    backend: str
    speed: float
    evidence: str
    device: Optional[str] = None
    dtypes: Optional[tuple[torch.dtype, ...]] = None
    min_tokens: int = 0
    max_tokens: Optional[int] = None
    min_fraction: float = 0.0
    max_fraction: float = 1.0
    training: Optional[bool] = None
    modes: Optional[tuple[str, ...]] = ("hard",)
    options: tuple[tuple[str, Any], ...] = ()

    def matches(self, call: Call) -> bool:
        """Whether the row's conditions hold for ``call``."""
        return (
            (self.modes is None or call.mode in self.modes)
            and (self.device is None or self.device == call.device)
            and (self.dtypes is None or call.dtype in self.dtypes)
            and call.tokens >= self.min_tokens
            and (self.max_tokens is None or call.tokens <= self.max_tokens)
            and self.min_fraction <= call.fraction <= self.max_fraction
            and (self.training is None or self.training == call.training)
        )


@dataclass(frozen=True)
class Backend:
    """A kernel as the registry knows it: one per kernel module (its ``BACKEND``).

    Attributes:
        name: What ``apply(backend=...)`` calls it.
        run: The kernel function (the signature of :class:`attnmask.kernels.Kernel`).
        capabilities: What it runs natively.
        rows: Its measurements, for ``auto``.
        auto: Whether ``auto`` may pick it at all (the float64 reference may not).
    """

    name: str
    run: Callable[..., torch.Tensor]
    capabilities: Capabilities
    rows: tuple[Measured, ...] = ()
    auto: bool = True
