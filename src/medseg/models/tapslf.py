"""TAP-SLF: task-aware soft prompts + selective-layer LoRA on a frozen ViT encoder (spec §6).

Wan & Lan, "TAP-SLF: Parameter-Efficient Adaptation of Vision Foundation Models for Multi-Task
Ultrasound Image Analysis", arXiv:2603.00433 (2026). The published method adapts the frozen Florence-2
vision tower; no foundation weights are available offline, so this is the spec's **ViT fallback**
(§6.3): a plain ViT (patch 16) whose weights come from masked-image-modelling pre-training on the
project's own training frames (:mod:`medseg.train.multitask`), then frozen.

- **Prompts** (§6.4): four groups (SEG, CLS, DET, REG), ``n_prompts`` tokens each, truncated-normal
  0.02; the task *type* picks the group. They are prepended after patch + position embedding (no
  position embedding on them, VPT-shallow), pass through every block and are dropped before the
  grid is reshaped, so they interact with every token and receive gradient (the official code's
  inert prompts are not reproduced). ``det_prompt=False`` reproduces "no prompt for detection".
- **LoRA** (§6.5): ``W'x = Wx + (alpha/r) B A dropout(x)`` on ``qkv`` and ``proj`` of the top
  ``floor(lora_fraction * depth)`` blocks, r 8, alpha 16, dropout 0.05, ``A`` Kaiming-uniform, ``B = 0``
  (so the adapted encoder starts equal to the frozen one).
- **Frozen backbone**: every encoder weight (patch embedding, position embedding, blocks, norm) is
  frozen; trainable are prompts, LoRA, adapter, neck, segmentation trunk and heads. Ablations as
  flags: ``lora_fraction`` 1.0 (full LoRA) or 0 (no LoRA), ``prompts=False``, ``freeze_percent``
  (freeze only the first ``floor(p * depth)`` blocks, the rest and the patch embedding train, as the
  official code does); ``lora_fraction=0, prompts=False`` is "freeze-all" (heads only).
- **Neck and heads** (§6.6): adapter 1x1 conv, neck (1x1 conv, 2 x [3x3 conv, BN, ReLU]),
  segmentation trunk (3 x [3x3 conv, BN, ReLU] with two bilinear x2 upsamplings) and a 1x1 head,
  upsampled to the input; classification = GAP of the adapter output, dropout 0.2, linear;
  keypoint regression = GAP of the adapter output, linear to ``2P`` normalised (x, y) coordinates.
  The ViT grid has stride 16 (not DaViT's 32), so the final upsampling is x4.

``forward(x)`` returns segmentation logits (this is what a pack and the Predictor run);
:meth:`TAPSLF.forward_task` runs one task type (``"seg"``, ``"cls"``, ``"reg"``) with its own prompt.
Any input size works: the position embedding is interpolated to the padded grid (spec §11.1).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from medseg.models.blocks import Mlp, SegmentationNet, init_transformer_weights
from medseg.models.registry import ModelCard, register

TASK_TYPES = ("seg", "cls", "det", "reg")

CONFIGS = {
    # spec §6.3 fallback: patch 16, 12 blocks, dim 384, 6 heads, adapter to 256 channels
    "full": dict(dim=384, depth=12, heads=6, adapter=256, trunk=(256, 128, 64)),
    # CPU: a third of the width, 8 blocks (LoRA on the top 2), half the neck
    "small": dict(dim=128, depth=8, heads=4, adapter=128, trunk=(128, 64, 32)),
}


# --------------------------------------------------------------------------- LoRA
class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update ``(alpha / r) B A dropout(x)``, ``B = 0`` at start."""

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16.0, dropout: float = 0.05) -> None:
        super().__init__()
        self.base = base
        self.r, self.scale = int(r), float(alpha) / float(r)
        self.lora_a = nn.Parameter(torch.empty(self.r, base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, self.r))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(self.dropout(x), self.lora_a), self.lora_b) * self.scale

    def extra_repr(self) -> str:
        return f"r={self.r}, scale={self.scale}"


# --------------------------------------------------------------------------- ViT
class Attention(nn.Module):
    """Multi-head self-attention (fused SDPA) with ``qkv`` and ``proj`` linear layers."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    """Pre-norm ViT block: ``x + attn(LN(x))``, ``x + mlp(LN(x))``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViTEncoder(nn.Module):
    """Patch-16 ViT on 3-channel input; learned position embedding for a ``grid x grid`` layout, interpolated for other sizes."""

    def __init__(self, dim: int, depth: int, heads: int, patch: int = 16, grid: int = 16, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.dim, self.patch, self.grid = dim, patch, grid
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, dim))
        self.blocks = nn.ModuleList([Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        init_transformer_weights(self)

    def position(self, gh: int, gw: int) -> torch.Tensor:
        if (gh, gw) == (self.grid, self.grid):
            return self.pos_embed
        pe = self.pos_embed.reshape(1, self.grid, self.grid, self.dim).permute(0, 3, 1, 2)
        pe = F.interpolate(pe, size=(gh, gw), mode="bicubic", align_corners=False)
        return pe.permute(0, 2, 3, 1).reshape(1, gh * gw, self.dim)

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """Patch tokens plus position embedding, ``(B, N, dim)``, and the grid size."""
        t = self.patch_embed(x)
        gh, gw = t.shape[-2:]
        return t.flatten(2).transpose(1, 2) + self.position(gh, gw), gh, gw

    def run(self, tokens: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            tokens = blk(tokens)
        return self.norm(tokens)

    def forward(self, x: torch.Tensor, prompts: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, dim, H/16, W/16)`` features; ``prompts`` ``(P, dim)`` are prepended and dropped again."""
        tokens, gh, gw = self.embed(x)
        n_prompt = 0
        if prompts is not None:
            n_prompt = prompts.shape[0]
            tokens = torch.cat([prompts.unsqueeze(0).expand(tokens.shape[0], -1, -1), tokens], dim=1)
        tokens = self.run(tokens)[:, n_prompt:]
        return tokens.transpose(1, 2).reshape(x.shape[0], self.dim, gh, gw)

    def forward_visible(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Masked-image modelling: encode only the patch tokens at indices ``keep`` ``(B, n_keep)``."""
        tokens, _, _ = self.embed(x)
        tokens = torch.gather(tokens, 1, keep.unsqueeze(-1).expand(-1, -1, self.dim))
        return self.run(tokens)


def _conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


# --------------------------------------------------------------------------- the network
class TAPSLF(SegmentationNet):
    """ViT encoder + task-aware prompts + selective LoRA; segmentation, plane classification and keypoint heads."""

    stride_multiple = 16
    min_side = 16

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 3,
        dim: int = 128,
        depth: int = 8,
        heads: int = 4,
        adapter: int = 128,
        trunk: tuple[int, int, int] = (128, 64, 32),
        n_prompts: int = 10,
        prompts: bool = True,
        det_prompt: bool = True,
        lora_fraction: float = 0.3,
        lora_rank: int = 8,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.05,
        freeze_percent: float | None = None,
        num_plane_classes: int = 4,
        num_keypoints: int = 3,
    ) -> None:
        super().__init__(in_channels, num_classes)
        self.encoder = ViTEncoder(dim, depth, heads)
        self.use_prompts, self.det_prompt = bool(prompts), bool(det_prompt)
        self.prompts = nn.Parameter(torch.empty(len(TASK_TYPES), n_prompts, dim)) if prompts else None
        if self.prompts is not None:
            nn.init.trunc_normal_(self.prompts, std=0.02)
        self.lora_blocks = list(range(depth - int(math.floor(lora_fraction * depth + 1e-9)), depth)) if lora_fraction > 0 else []
        for i in self.lora_blocks:
            attn = self.encoder.blocks[i].attn
            attn.qkv = LoRALinear(attn.qkv, lora_rank, lora_alpha, lora_dropout)
            attn.proj = LoRALinear(attn.proj, lora_rank, lora_alpha, lora_dropout)
        self.adapter = nn.Conv2d(dim, adapter, 1)
        self.neck = nn.Sequential(nn.Conv2d(adapter, adapter, 1), _conv_bn_relu(adapter, adapter), _conv_bn_relu(adapter, adapter))
        t0, t1, t2 = trunk
        self.seg_trunk = nn.ModuleList([_conv_bn_relu(adapter, t0), _conv_bn_relu(t0, t1), _conv_bn_relu(t1, t2)])
        self.seg_head = nn.Conv2d(t2, num_classes, 1)
        self.cls_head = nn.Sequential(nn.Dropout(0.2), nn.Linear(adapter, num_plane_classes))
        self.reg_head = nn.Linear(adapter, 2 * num_keypoints)
        self.num_keypoints = num_keypoints
        self.freeze_percent = freeze_percent
        self.set_trainable()

    # ---- which parameters train
    def set_trainable(self) -> None:
        """Freeze the backbone (all of it, or the first ``freeze_percent`` of the blocks); LoRA, prompts, neck and heads train."""
        for p in self.encoder.parameters():
            p.requires_grad = False
        if self.freeze_percent is not None:
            n_frozen = int(math.floor(self.freeze_percent * len(self.encoder.blocks) + 1e-9))
            for p in self.encoder.patch_embed.parameters():
                p.requires_grad = True
            for blk in list(self.encoder.blocks)[n_frozen:]:
                for p in blk.parameters():
                    p.requires_grad = True
            for p in self.encoder.norm.parameters():
                p.requires_grad = True
        for m in self.encoder.modules():
            if isinstance(m, LoRALinear):
                m.lora_a.requires_grad = True
                m.lora_b.requires_grad = True
                if self.freeze_percent is None:
                    m.base.weight.requires_grad = False
                    m.base.bias.requires_grad = False

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by the spec's optimiser groups (§6.8): prompt/LoRA/adapter, neck+trunk, seg head, other heads, backbone."""
        groups: dict[str, list[nn.Parameter]] = {"adapt": [], "neck": [], "seg_head": [], "heads": [], "backbone": []}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            if name == "prompts" or "lora_" in name or name.startswith("adapter."):
                groups["adapt"].append(p)
            elif name.startswith(("neck.", "seg_trunk.")):
                groups["neck"].append(p)
            elif name.startswith("seg_head."):
                groups["seg_head"].append(p)
            elif name.startswith(("cls_head.", "reg_head.")):
                groups["heads"].append(p)
            else:
                groups["backbone"].append(p)
        return groups

    # ---- forward
    def prompt(self, task: str) -> torch.Tensor | None:
        if task not in TASK_TYPES:
            raise ValueError(f"task must be one of {TASK_TYPES}, not {task!r}")
        if self.prompts is None or (task == "det" and not self.det_prompt):
            return None
        return self.prompts[TASK_TYPES.index(task)]

    def adapted(self, x: torch.Tensor, task: str) -> torch.Tensor:
        """Adapter output ``u`` (B, adapter, H/16, W/16) of a 3-channel padded input for one task type."""
        return self.adapter(self.encoder(x, self.prompt(task)))

    def segment(self, u: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        y = self.seg_trunk[0](self.neck(u))
        for layer in self.seg_trunk[1:]:
            y = layer(F.interpolate(y, scale_factor=2, mode="bilinear", align_corners=False))
        return F.interpolate(self.seg_head(y), size=size, mode="bilinear", align_corners=False)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.segment(self.adapted(x, "seg"), x.shape[-2:])

    def forward_task(self, x: torch.Tensor, task: str) -> torch.Tensor:
        """``seg``: logits (B, K, H, W); ``cls``: plane logits (B, C); ``reg``: keypoints (B, P, 2) as normalised (x, y)."""
        if task == "seg":
            return self.forward(x)
        if x.shape[1] != self.in_channels:
            raise ValueError(f"expected {self.in_channels} input channels, got {x.shape[1]}")
        if self.in_channels == 1:
            x = x.expand(-1, 3, -1, -1)
        h, w = x.shape[-2:]
        padded = F.pad(x, (0, -w % 16, 0, -h % 16), mode="replicate") if (h % 16 or w % 16) else x
        pooled = self.adapted(padded, task).mean(dim=(2, 3))
        if task == "cls":
            return self.cls_head(pooled)
        if task == "reg":
            # coordinates normalised by the unpadded size: rescale from the padded grid
            pts = self.reg_head(pooled).reshape(-1, self.num_keypoints, 2)
            return pts * pts.new_tensor([padded.shape[-1] / w, padded.shape[-2] / h])
        raise ValueError(f"task must be 'seg', 'cls' or 'reg' (this network has no detection head), not {task!r}")


def trainable_fraction(model: nn.Module) -> tuple[int, int]:
    """(trainable parameters, all parameters)."""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total


@register(
    ModelCard(
        name="tapslf",
        title="TAP-SLF (task-aware prompts + selective-layer LoRA on a frozen ViT)",
        task="2-D semantic segmentation + plane classification + keypoint regression",
        paper="Wan, Lan, 'TAP-SLF: Parameter-Efficient Adaptation of Vision Foundation Models for Multi-Task Ultrasound Image Analysis', arXiv:2603.00433 (2026)",
        notes="ViT fallback of spec §6.3 (no Florence-2 weights offline): the encoder is pre-trained by masked-image modelling on "
        "the training frames and frozen; prompts, LoRA (top 30% of the blocks), neck and heads train. full: dim 384, 12 blocks; "
        "small: dim 128, 8 blocks.",
    )
)
def build_tapslf(in_channels: int = 1, num_classes: int = 3, config: str = "small", **overrides) -> TAPSLF:
    return TAPSLF(in_channels, num_classes, **{**CONFIGS[config], **overrides})


__all__ = ["CONFIGS", "TASK_TYPES", "Attention", "Block", "LoRALinear", "TAPSLF", "ViTEncoder", "build_tapslf", "trainable_fraction"]
