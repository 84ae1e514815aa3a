"""``backend="auto"``: the backend the benchmarks found fastest, chosen per call.

Each call looks at what decides speed: the mask mode, device, dtype, token count, the
fraction of heads masked, and whether it is training (gradients flowing, or dropout on). The
first matching row of :data:`AUTO_TABLE` names the backend. The rows and the measurements
they rest on are below; ``benchmarks/run.py`` re-measures them (``docs/performance.md``
shows the results). Soft mode always runs on SDPA (it has no sparsity to exploit).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..masks import LocalMask


CPU_EVIDENCE_FLEX = (
    "CPU (2-core AMD EPYC, 2 threads, torch 2.14.1, fp32, batch 1, 12 heads x 64, 7x7 window, forward; "
    "benchmarks/results/cpu-amd-epyc.json), speed relative to dense SDPA, half / all heads masked: compiled "
    "FlexAttention with 64-blocks 1.17x / 1.43x at 2305 tokens and 1.40x / 2.16x at 4097, against 0.90x / "
    "0.88x and 0.93x / 0.88x for the SDPA kernel; 128-blocks 0.98x / 0.97x and 1.32x / 1.72x. At 1025 "
    "tokens and below FlexAttention lost (0.91x / 0.78x against SDPA's 1.05x / 0.90x). Whole timm "
    "ViT-B/16 at 1024 px, inference: auto 1.18x the unpatched throughput, sdpa 0.99x. No backward on CPU."
)
SOFT_EVIDENCE = (
    "Soft mode (the paper's Eq. 2: forbidden logits set to 0, not -inf) lets every key contribute, so "
    "no block is skippable and FlexAttention's block sparsity has nothing to gain; it would run "
    "densely with a score_mod, and it has no dropout and no CPU backward. SDPA's backend runs the "
    "masked heads with explicit dense math (any device, dtype, training) and keeps global heads on "
    "the dense SDPA path. Not measured: a reasoned choice, not a benchmark."
)
CUDA_EVIDENCE_FLEX = (
    "H100, bf16, torch 2.11, 12 heads x 64, 7x7 window, class token, forward "
    "(benchmarks/results/gpu_probe_h100.json; ratio to dense flash SDPA, per call / back to back): "
    "1025 tokens, half the heads masked: FlexAttention with 64-token blocks 0.82x / 0.68x, SDPA split "
    "0.76x / 0.63x, 128-token blocks 0.56x / 0.51x; 4097 tokens, half: 0.85x / 0.91x vs SDPA 0.77x / 0.71x; "
    "all: 0.92x / 1.22x vs 0.73x / 0.62x. Whole timm ViT-B/16 at 1024 px, half the heads masked: 0.966x "
    "the unpatched throughput with 64-token blocks, SDPA split 0.823x, 128-token blocks 0.840x; with "
    "this table, auto 0.96x vs sdpa 0.86x (benchmarks/results/nvidia-h100-80gb-hbm3-auto.json). Not "
    "below 4097 tokens: at 512 px (1025 tokens) 64-token blocks gave 0.68x the unpatched ViT-B/16 "
    "against SDPA's 0.90x, although the attention-level probe favoured them; 1026-4096 tokens are "
    "not measured and stay on SDPA."
)
CUDA_EVIDENCE_FLEX_TRAIN = (
    "H100, bf16, torch 2.11, forward+backward (benchmarks/results/nvidia-h100-80gb-hbm3.json): 4097 "
    "tokens, FlexAttention (128-token blocks) 0.71x / 0.99x dense with half / all heads masked, SDPA 0.60x / "
    "0.56x; at 1025 tokens SDPA wins (0.49x / 0.65x vs 0.45x / 0.56x). ViT-B/16 training step at 1024 px: "
    "flex 0.87x the unpatched model, sdpa 0.80x (benchmarks/results/h100-logs/call1-device_check.log)."
)
CUDA_EVIDENCE_ONE_CALL = (
    "H100, bf16, torch 2.11, below 1025 tokens (benchmarks/results/gpu_probe_h100.json): 197 tokens, half "
    "the heads masked: every head in one cuDNN SDPA call with a per-head additive mask 0.90x / 0.63x dense "
    "(per call / back to back), the split path 0.67x / 0.49x; all heads masked: 0.78x / 0.62x vs 0.98x / "
    "0.63x. Whole timm ViT-B/16 at 224 px, half masked: 0.936x the unpatched throughput, split 0.902x, "
    "FlexAttention 0.71x-0.76x; with this table, auto 0.95x vs sdpa 0.92x "
    "(benchmarks/results/nvidia-h100-80gb-hbm3-auto.json). At 1025 tokens the split path wins "
    "(0.76x vs 0.69x per call), so the row stops at 1024."
)
CPU_EVIDENCE_SDPA = (
    "CPU below 2305 tokens, in training (FlexAttention has no CPU backward) and in dtypes other than "
    "float32 (not measured): SDPA with the cached additive mask, 0.75x-1.05x dense SDPA at 197-1025 tokens "
    "(benchmarks/results/cpu-amd-epyc.json; cells of 10-20 ms vary by 5-15% run to run here)."
)


@dataclass(frozen=True)
class AutoRule:
    """One row of the choice table: conditions (``None`` = any) and the backend to use.

    Attributes:
        backend: Name of the kernel to run.
        device: ``"cpu"``, ``"cuda"``, or ``None``.
        dtypes: Dtypes the row applies to, or ``None``.
        min_tokens: Smallest token count the row applies to.
        max_tokens: Largest token count the row applies to (``None``: no limit).
        min_fraction: Smallest fraction of masked heads the row applies to.
        training: ``True``/``False`` for training/inference only, ``None`` for both.
        modes: Mask modes (``"hard"``, ``"soft"``) the row applies to, or ``None`` for both.
        options: Keyword arguments for the kernel (e.g. FlexAttention's ``block_size``).
        evidence: The measurement the row rests on.
    """

    backend: str
    device: Optional[str] = None
    dtypes: Optional[tuple[torch.dtype, ...]] = None
    min_tokens: int = 0
    max_tokens: Optional[int] = None
    min_fraction: float = 0.0
    training: Optional[bool] = None
    modes: Optional[tuple[str, ...]] = None
    options: tuple[tuple[str, Any], ...] = ()
    evidence: str = ""

    def matches(
        self, device: str, dtype: torch.dtype, tokens: int, fraction: float, training: bool, mode: str = "hard"
    ) -> bool:
        return (
            (self.modes is None or mode in self.modes)
            and (self.device is None or self.device == device)
            and (self.dtypes is None or dtype in self.dtypes)
            and tokens >= self.min_tokens
            and (self.max_tokens is None or tokens <= self.max_tokens)
            and fraction >= self.min_fraction
            and (self.training is None or self.training == training)
        )


AUTO_TABLE: tuple[AutoRule, ...] = (
    AutoRule("sdpa", modes=("soft",), evidence=SOFT_EVIDENCE),
    AutoRule(
        "flex",
        device="cpu",
        dtypes=(torch.float32,),
        min_tokens=2305,
        training=False,
        options=(("block_size", 64),),
        evidence=CPU_EVIDENCE_FLEX,
    ),
    AutoRule("sdpa", device="cpu", evidence=CPU_EVIDENCE_SDPA),
    AutoRule(
        "flex",
        device="cuda",
        dtypes=(torch.bfloat16, torch.float16),
        min_tokens=4097,
        training=False,
        options=(("block_size", 64),),
        evidence=CUDA_EVIDENCE_FLEX,
    ),
    AutoRule("flex", device="cuda", min_tokens=4097, training=True, evidence=CUDA_EVIDENCE_FLEX_TRAIN),
    AutoRule(
        "sdpa",
        device="cuda",
        dtypes=(torch.bfloat16, torch.float16),
        max_tokens=1024,
        training=False,
        options=(("one_call", True),),
        evidence=CUDA_EVIDENCE_ONE_CALL,
    ),
    AutoRule(
        "sdpa",
        evidence="Everything else: SDPA with the additive mask; global heads on the dense (flash) path.",
    ),
)
"""The choice table, first match wins. Soft mode goes to SDPA first of all (dense by
definition). The CUDA rows rest on one H100 (torch 2.11, bf16); other GPUs and dtypes take
the same rows unmeasured. None of them reaches the unpatched model's throughput at 224 or 1024
px (0.94x and 0.97x at best, see the evidence): closing that gap needs a fused kernel."""


def choose_rule(
    device: str, dtype: torch.dtype, tokens: int, fraction: float, training: bool, mode: str = "hard"
) -> AutoRule:
    """The first row of :data:`AUTO_TABLE` that matches one call."""
    for rule in AUTO_TABLE:
        if rule.matches(device, dtype, tokens, fraction, training, mode):
            return rule
    return AUTO_TABLE[-1]


def choose_backend(
    device: str, dtype: torch.dtype, tokens: int, fraction: float, training: bool, mode: str = "hard"
) -> str:
    """The backend :data:`AUTO_TABLE` picks for one call (first matching row)."""
    return choose_rule(device, dtype, tokens, fraction, training, mode).backend


def auto_rule(
    q: torch.Tensor, mask: LocalMask, dropout_p: float = 0.0, k: Optional[torch.Tensor] = None, v: Optional[torch.Tensor] = None
) -> AutoRule:
    """The row of :data:`AUTO_TABLE` that ``"auto"`` follows for these tensors and this mask.

    Per-sample ``positions`` (a block mask per forward), attention dropout and masks that
    restrict nothing go to SDPA (the last row). It is training when gradients are enabled
    and any of ``q``, ``k``, ``v`` requires them (e.g. only the value projection trained).
    """
    if mask.is_identity or mask.positions is not None or dropout_p:
        return AUTO_TABLE[-1]
    training = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v))
    fraction = len(mask.heads) / mask.num_heads
    return choose_rule(q.device.type, q.dtype, q.shape[-2], fraction, training, mask.mode)


def auto_choice(
    q: torch.Tensor, mask: LocalMask, dropout_p: float = 0.0, k: Optional[torch.Tensor] = None, v: Optional[torch.Tensor] = None
) -> str:
    """The backend ``"auto"`` runs for these tensors and this mask (see :func:`auto_rule`)."""
    return auto_rule(q, mask, dropout_p, k, v).backend
