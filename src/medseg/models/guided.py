"""Click-guided variant of any registered network: extra input channels for guidance maps.

Interactive packs (DeepGrow/DeepEdit, RITM style) feed the network the image plus guidance maps
(positive clicks, negative clicks, previous mask). :class:`GuidedNet` wraps a built network: the
image channels go through the usual grey -> RGB adapter, the guidance channels are concatenated
after them, and the network's stem convolution (its first ``Conv2d`` taking 3 channels) is widened
to take them. Weights of an automatic pack load into the widened stem with the guidance filters
set to zero, so training starts from the automatic network's behaviour.
"""

from __future__ import annotations

import torch
from torch import nn

from medseg.models.blocks import SegmentationNet, pad_to_multiple


def _stem(model: nn.Module) -> tuple[nn.Module, str, nn.Conv2d]:
    """(parent module, attribute name, conv) of the first Conv2d that reads the 3 image channels."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and module.in_channels == 3:
            parent_name, _, attr = name.rpartition(".")
            return model.get_submodule(parent_name) if parent_name else model, attr, module
    raise ValueError(f"{type(model).__name__} has no convolution over the 3 image channels to widen")


class GuidedNet(nn.Module):
    """A segmentation network taking ``image channels + guidance`` input channels."""

    def __init__(self, base: SegmentationNet, guidance: int) -> None:
        super().__init__()
        if guidance < 1:
            raise ValueError(f"guidance channels must be at least 1, not {guidance}")
        self.base = base
        self.image_channels = base.in_channels
        self.guidance = guidance
        self.in_channels = base.in_channels + guidance
        self.num_classes = base.num_classes
        parent, attr, conv = _stem(base)
        wide = nn.Conv2d(
            3 + guidance, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode
        )
        with torch.no_grad():
            wide.weight.zero_()
            wide.weight[:, :3] = conv.weight
            if conv.bias is not None:
                wide.bias.copy_(conv.bias)
        setattr(parent, attr, wide)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.in_channels:
            raise ValueError(f"expected {self.in_channels} input channels, got {x.shape[1]}")
        image, guidance = x[:, : self.image_channels], x[:, self.image_channels :]
        if self.image_channels == 1:
            image = image.expand(-1, 3, -1, -1)
        h, w = x.shape[-2:]
        padded = pad_to_multiple(torch.cat([image, guidance], dim=1), self.base.stride_multiple, self.base.min_side)
        return self.base.forward_features(padded)[..., :h, :w]


def load_widened(model: GuidedNet, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """Copy an automatic network's weights into ``model``: matching tensors as they are, the stem's
    image filters into the widened stem, and the output layer row by row (background, then the mean
    of the foreground rows when the class counts differ). Returns ``(loaded_keys, skipped_keys)``.
    """
    own = model.state_dict()
    loaded, skipped = [], []
    for key, value in state.items():
        target = f"base.{key}"
        if target not in own:
            skipped.append(key)
            continue
        mine = own[target]
        if mine.shape == value.shape:
            own[target] = value.to(mine.dtype)
        elif mine.ndim == 4 and value.ndim == 4 and mine.shape[0] == value.shape[0] and mine.shape[1] > value.shape[1]:
            own[target] = mine.clone()
            own[target][:, : value.shape[1]] = value
        elif mine.ndim >= 1 and mine.shape[1:] == value.shape[1:] and mine.shape[0] == 2 and value.shape[0] > 2:
            own[target] = torch.stack([value[0], value[1:].float().mean(0).to(value.dtype)])
        else:
            skipped.append(key)
            continue
        loaded.append(key)
    model.load_state_dict(own)
    return loaded, skipped


__all__ = ["GuidedNet", "load_widened"]
