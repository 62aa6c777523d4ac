"""The model registry: architecture name -> constructor and model card.

Every network is built as ``build(name, in_channels, num_classes, config)`` where ``config`` is
``"small"`` (trains on a CPU) or ``"full"`` (as published). Packs name an architecture and config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from medseg.errors import UsageError


@dataclass(frozen=True)
class ModelCard:
    """What a person needs to know to choose a network."""

    name: str
    title: str
    task: str
    paper: str
    configs: tuple[str, ...] = ("small", "full")
    input_channels: tuple[int, ...] = (1, 3)
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    kind: str = "segmentation"  # "segmentation": image in, per-pixel logits out; "sequence": per-frame features in (in_channels = feature width)


@dataclass(frozen=True)
class _Entry:
    card: ModelCard
    constructor: Callable[..., nn.Module]


_REGISTRY: dict[str, _Entry] = {}


def register(card: ModelCard) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Class or function decorator adding a constructor under ``card.name``."""

    def wrap(constructor: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if card.name in _REGISTRY:
            raise RuntimeError(f"model '{card.name}' registered twice")
        _REGISTRY[card.name] = _Entry(card, constructor)
        return constructor

    return wrap


def names(kind: str | None = "segmentation") -> list[str]:
    """Registered architectures of one ``kind`` (``None``: all)."""
    return sorted(n for n, e in _REGISTRY.items() if kind is None or e.card.kind == kind)


def card(name: str) -> ModelCard:
    return _entry(name).card


def _entry(name: str) -> _Entry:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UsageError(
            f"Unknown architecture '{name}': choose one of {', '.join(names(None))} (see 'medseg models')."
        ) from None


def build(name: str, in_channels: int = 3, num_classes: int = 2, config: str = "small", **overrides: Any) -> nn.Module:
    """Instantiate architecture ``name`` in ``config`` for ``in_channels`` inputs and ``num_classes`` outputs."""
    entry = _entry(name)
    if config not in entry.card.configs:
        raise UsageError(f"Architecture '{name}' has no config '{config}': choose one of {', '.join(entry.card.configs)}.")
    if entry.card.input_channels and in_channels not in entry.card.input_channels:
        raise UsageError(
            f"Architecture '{name}' takes {' or '.join(map(str, entry.card.input_channels))} input channels, not {in_channels}."
        )
    if num_classes < 1:
        raise UsageError(f"num_classes must be at least 1, not {num_classes}.")
    return entry.constructor(in_channels=in_channels, num_classes=num_classes, config=config, **overrides)


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _register_cpu_sdpa_flops() -> None:
    """Teach FlopCounterMode the fused CPU attention kernel (torch counts only the CUDA SDPA kernels).

    ``F.scaled_dot_product_attention`` on the CPU dispatches to
    ``aten._scaled_dot_product_flash_attention_for_cpu``, which FlopCounterMode would otherwise count as
    zero, dropping full-attention products (MedFormer stage 4, plain MHSA) from :func:`count_macs`. SDPA
    calls that take PyTorch's math path instead (e.g. DCA's, whose value head is wider than its query/key
    heads) decompose into ``bmm`` and are counted either way. Same formula as the CUDA kernels: QK^T plus
    AV, ``2 * b * h * (Nq * Nk * d_qk + Nq * Nk * d_v)`` FLOPs.
    """
    from torch.utils.flop_counter import flop_registry, register_flop_formula, sdpa_flop_count

    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None or op in flop_registry:
        return

    @register_flop_formula(op)
    def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)


_register_cpu_sdpa_flops()


def count_macs(model: nn.Module, size: int | tuple[int, int] = 256, in_channels: int = 3) -> int:
    """Multiply-accumulates of one forward at batch 1 (conv, linear, matmul, fused SDPA; FLOPs = 2 x MACs)."""
    from torch.utils.flop_counter import FlopCounterMode

    h, w = (size, size) if isinstance(size, int) else size
    was_training = model.training
    model.eval()
    x = torch.zeros(1, in_channels, h, w)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    model.train(was_training)
    return counter.get_total_flops() // 2
