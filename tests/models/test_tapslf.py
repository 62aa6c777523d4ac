"""TAP-SLF (spec §6): shapes of the three heads, the frozen/trainable split, prompts and LoRA, key-point AoP."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medseg import models
from medseg.measure.biometry import aop_from_points, aop_hsd
from medseg.models.tapslf import LoRALinear, TAPSLF, trainable_fraction
from medseg.train.multitask import keypoint_targets, keypoints_to_rc, task_loss

TINY = dict(dim=32, depth=4, heads=2, adapter=16, trunk=(16, 8, 8), n_prompts=3, lora_fraction=0.25)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**kw) -> TAPSLF:
    return models.build("tapslf", in_channels=1, num_classes=3, config="small", **{**TINY, **kw})


def test_forward_shapes_of_the_three_tasks_any_size():
    m = tiny().eval()
    x = torch.randn(2, 1, 72, 56)
    with torch.no_grad():
        assert m(x).shape == (2, 3, 72, 56)
        assert m.forward_task(x, "seg").shape == (2, 3, 72, 56)
        assert m.forward_task(x, "cls").shape == (2, 4)
        pts = m.forward_task(x, "reg")
        assert pts.shape == (2, 3, 2)
    with pytest.raises(ValueError, match="detection"):
        m.forward_task(x, "det")


def test_only_lora_prompts_adapter_neck_and_heads_train():
    m = tiny()
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert "prompts" in trainable
    assert all(n.startswith(("prompts", "adapter.", "neck.", "seg_trunk.", "seg_head.", "cls_head.", "reg_head.")) or "lora_" in n for n in trainable)
    # LoRA on the top floor(0.25 * 4) = 1 block only, on qkv and proj
    lora = sorted(n for n in trainable if "lora_" in n)
    assert lora == [f"encoder.blocks.3.attn.{layer}.lora_{ab}" for layer in ("proj", "qkv") for ab in "ab"]
    assert not any(p.requires_grad for p in m.encoder.patch_embed.parameters())
    assert not m.encoder.pos_embed.requires_grad
    assert not m.encoder.blocks[3].attn.qkv.base.weight.requires_grad
    n_train, n_all = trainable_fraction(m)
    assert n_train == sum(p.numel() for n, p in m.named_parameters() if n in trainable)
    assert 0 < n_train < n_all


def test_gradient_reaches_prompts_and_lora_but_not_the_backbone():
    m = tiny()
    x = torch.randn(2, 1, 32, 32)
    for task in ("seg", "cls", "reg"):
        m.zero_grad()
        m.forward_task(x, task).float().pow(2).mean().backward()
        idx = ("seg", "cls", "det", "reg").index(task)
        assert m.prompts.grad[idx].abs().sum() > 0  # the prompts interact with the tokens
        assert m.prompts.grad[[i for i in range(4) if i != idx]].abs().sum() == 0  # other task types' prompts untouched
        assert m.encoder.blocks[3].attn.qkv.lora_b.grad.abs().sum() > 0
        assert all(p.grad is None for n, p in m.encoder.named_parameters() if "lora_" not in n)


def test_lora_starts_as_the_frozen_backbone():
    m = tiny().eval()
    plain = tiny(lora_fraction=0.0).eval()
    state = {k.replace(".base.", "."): v for k, v in m.state_dict().items() if "lora_" not in k}
    plain.load_state_dict(state)
    x = torch.randn(1, 1, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(m(x), plain(x))
    layer = LoRALinear(torch.nn.Linear(4, 5))
    assert torch.count_nonzero(layer.lora_b) == 0 and layer.scale == 2.0


def test_ablation_flags():
    no_prompt = tiny(prompts=False)
    assert no_prompt.prompts is None and no_prompt.prompt("seg") is None
    heads_only = tiny(prompts=False, lora_fraction=0.0)
    assert not any("lora_" in n for n, _ in heads_only.named_parameters())
    full_lora = tiny(lora_fraction=1.0)
    assert all(isinstance(b.attn.qkv, LoRALinear) for b in full_lora.encoder.blocks)
    partly = tiny(freeze_percent=0.5)  # the official code's partial freeze: the last half of the blocks and the patch embedding train
    assert partly.encoder.blocks[3].mlp.fc1.weight.requires_grad and not partly.encoder.blocks[1].mlp.fc1.weight.requires_grad
    assert partly.encoder.patch_embed.weight.requires_grad
    assert trainable_fraction(heads_only)[0] < trainable_fraction(tiny())[0] < trainable_fraction(partly)[0]


def _synthetic_mask() -> tuple[np.ndarray, float]:
    """A horizontal symphysis bar (rows 40-44, cols 20-80) and a disc head centred (100, 140) radius 30; AoP analytic."""
    m = np.zeros((192, 192), np.uint8)
    m[40:45, 20:81] = 1
    rr, cc = np.mgrid[:192, :192]
    m[(rr - 100) ** 2 + (cc - 140) ** 2 <= 30**2] = 2
    return m, 0.0


def test_keypoint_aop_equals_the_mask_aop_on_a_synthetic_case():
    mask, _ = _synthetic_mask()
    ref = aop_hsd(mask)
    assert ref.ok
    points, ok = keypoint_targets(mask)
    assert ok and points.shape == (3, 2)
    rc = keypoints_to_rc(points, mask.shape)
    assert aop_from_points(*rc) == pytest.approx(ref.aop, abs=1e-9)
    # analytic: V at the bar's right end, E at the left, tangent from V to the disc
    v, e = np.array(ref.vertex, float), np.array(ref.other_end, float)
    centre = np.array([100.0, 140.0])
    d = np.linalg.norm(centre - v)
    axis_angle = math.atan2(*(e - v))  # direction V->E as (row, col)
    to_centre = math.atan2(*(centre - v))
    tangent_dir = to_centre - math.asin(30 / d)  # the tangent that leaves the whole head on one side, away from E
    expected = math.degrees(abs(math.remainder(tangent_dir - axis_angle, 2 * math.pi)))
    assert ref.aop == pytest.approx(expected, abs=1.5)  # the pixel contour vs the ideal disc


def test_keypoint_loss_ignores_unmeasurable_frames():
    m = tiny()
    x = torch.randn(2, 1, 32, 32)
    points = torch.rand(2, 3, 2)
    loss_both = task_loss(m, "reg", x, (points, torch.tensor([True, True])))
    loss_none = task_loss(m, "reg", x, (points, torch.tensor([False, False])))
    assert loss_both > 0 and loss_none == 0
