"""timm adapter for CaiT (``timm.models.cait.TalkingHeadAttn``).

CaiT's self-attention layers use talking-heads attention: ``proj_l`` mixes the heads' logits
before the softmax and ``proj_w`` mixes the heads' attention weights after it. The class
token joins only later, in the class-attention layers (``ClassAttn`` in
``model.blocks_token_only``), so the self-attention layers see the patch tokens alone: no
prefix tokens. Class-attention layers are left global (``describe()`` says so).

:class:`MaskedTalkingHeadAttn` repeats the host's forward and fills the head-mixed logits of
the chosen heads where the locality mask forbids attention (``-inf`` in hard mode, 0 in soft
mode, :func:`~attnmask.masks.mask_logits`), after ``proj_l`` and before the softmax.
``proj_w`` then remixes all heads' weights, so a masked head's output is strictly local only
when every head it is mixed with is masked: use ``heads="all"`` for strict locality.

Why this family does not go through an attnmask kernel (as timm Swin, BEiT and the others
do): a kernel (:mod:`attnmask.kernels`) computes ``softmax(q k^T * scale + host mask) v``
head by head, each head from its own q, k and v. Talking heads are not that shape: the
logit a head's softmax sees is ``proj_l`` applied across *all* heads' ``q k^T``, and the
weights it multiplies ``v`` by are ``proj_w`` applied across *all* heads' probabilities. No
per-head q', k' or additive host mask expresses either mixing, so the adapter repeats CaiT's
own arithmetic. ``backend="auto"`` runs it in the host's dtype, ``backend="reference"``
computes the logits, both head mixings, the softmax and the weighted sum in float64 (for
tests), and ``"sdpa"``/``"flex"`` are refused; ``locality_scores`` refuses CaiT too (no kernel
call to record).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.cait import ClassAttn, TalkingHeadAttn
from torch import nn

from ..kernels import record
from ..masks import mask_logits
from ..spec import LayerPlan
from .layouts import PatchLayout
from .timm_vit import TimmPatchAdapter


def _mix_heads(layer: nn.Linear, attn: torch.Tensor) -> torch.Tensor:
    """Apply a head-mixing ``nn.Linear(num_heads, num_heads)`` to ``(B, H, N, N)`` weights.

    In float64 when ``attn`` is (the reference backend), else by calling ``layer`` as the host does.
    """
    attn = attn.permute(0, 2, 3, 1)
    if attn.dtype == torch.float64 and layer.weight.dtype != torch.float64:
        bias = layer.bias.double() if layer.bias is not None else None
        attn = F.linear(attn, layer.weight.double(), bias)
    else:
        attn = layer(attn)
    return attn.permute(0, 3, 1, 2)


class MaskedTalkingHeadAttn(TalkingHeadAttn):
    """``TalkingHeadAttn`` whose chosen heads' mixed logits are local (see the module docstring)."""

    _attnmask_plan: LayerPlan
    _attnmask_tokens: PatchLayout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        plan = self._attnmask_plan
        mask = self._attnmask_tokens.mask(plan, B, N)
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        if plan.backend == "reference":
            qkv = qkv.double()
        q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]

        attn = q @ k.transpose(-2, -1)
        attn = _mix_heads(self.proj_l, attn)
        attn = mask_logits(attn, mask)
        attn = attn.softmax(dim=-1)
        recorder = record.current_recorder()
        if recorder is not None:  # the masked (head-mixed) weights, before proj_w mixes them again
            recorder(attn.float(), mask)
        attn = _mix_heads(self.proj_w, attn)
        attn = self.attn_drop(attn)

        x = (attn @ v).to(x.dtype).transpose(1, 2).reshape(B, N, C)
        x = self.proj(x)
        x = self.proj_drop(x)
        return x


class TimmCaiTAdapter(TimmPatchAdapter):
    """Adapter for timm's CaiT (registered as ``"timm.cait"``)."""

    name = "timm.cait"
    masked = {TalkingHeadAttn: MaskedTalkingHeadAttn}
    layers = "TalkingHeadAttn"
    # Masked heads run in the host's own talking-heads arithmetic, not an attnmask kernel.
    backends = ("auto", "reference")
    backend_label = "CaiT's talking-heads attention, masked logits (float64 with backend='reference')"

    def prefix_tokens(self, model: nn.Module) -> int:
        return 0  # the self-attention layers see patch tokens only: the class token joins later

    def notes(self, model: nn.Module) -> list[str]:
        notes = []
        class_attn = sum(1 for m in model.modules() if isinstance(m, ClassAttn))
        if class_attn:
            layers = "layer (ClassAttn) is" if class_attn == 1 else "layers (ClassAttn) are"
            notes.append(f"{class_attn} class-attention {layers} left global")
        notes.append(
            "talking-heads attention remixes heads after the softmax (proj_w): a masked head is "
            "strictly local only when all heads of its layer are masked"
        )
        return notes


ADAPTER = TimmCaiTAdapter()
