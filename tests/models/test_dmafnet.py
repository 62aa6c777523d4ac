"""DMAF-Net (spec §5, §11.7 items 9-10): the adaptive mask removes absent sequences, fusion weights sum to
one over the present ones, distillation losses vanish for identical features, every subset trains."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from medseg import models
from medseg.models.dmafnet import (
    DMAFNet,
    as_tokens,
    covariance_loss,
    grid_adjacency,
    prototype_loss,
    soft_class_masks,
)
from tests.multiseq.packs import TINY

SUBSETS = [s for s in itertools.product([False, True], repeat=3) if any(s)]


@pytest.fixture
def net() -> DMAFNet:
    torch.manual_seed(0)
    return models.build("dmafnet", in_channels=3, num_classes=6, config="small", **TINY).eval()


def test_registered_with_both_configs():
    card = models.card("dmafnet")
    assert card.configs == ("small", "full") and 3 in card.input_channels
    full = models.build("dmafnet", 3, 6, "full")
    assert full.dims == (16, 32, 64, 128, 256) and len(full.fusions[0].layers) == 4


def test_absent_sequence_values_have_no_effect(net):
    torch.manual_seed(1)
    x = torch.randn(2, 3, 64, 48)
    present = torch.tensor([[True, False, True], [False, True, False]])
    other = x.clone()
    other[0, 1] = torch.randn(64, 48) * 1e4  # absent in sample 0
    other[1, 0] = float("nan")  # absent in sample 1: not even NaN leaks through
    other[1, 2] = 7.0
    with torch.no_grad():
        a, b = net(x, present), net(other, present)
        assert torch.equal(a, b)
        # the same change does matter when the sequence is present (the test can fail)
        changed = x.clone()
        changed[0, 1] = other[0, 1]
        assert not torch.allclose(net(x), net(changed))


def test_fusion_weights_sum_to_one_over_present_sequences(net):
    x = torch.randn(len(SUBSETS), 3, 32, 32)
    present = torch.tensor(SUBSETS)
    with torch.no_grad():
        out = net.forward_fusion(x, present)
    for att in out.attention:
        sums = att.sum(dim=1)
        torch.testing.assert_close(sums, torch.ones_like(sums))
        absent = ~present[:, :, None, None].expand_as(att)
        assert torch.all(att[absent] == 0)
        assert torch.all(att[~absent] > 0)
    torch.testing.assert_close(out.weights.sum(dim=1), torch.ones(len(SUBSETS)))
    assert torch.all(out.weights[~present] == 0)


def test_an_empty_subset_is_refused(net):
    with pytest.raises(ValueError, match="at least one present"):
        net(torch.randn(1, 3, 32, 32), torch.tensor([False, False, False]))


def test_covariance_and_prototype_losses_vanish_for_identical_features():
    torch.manual_seed(2)
    feats = torch.randn(2, 16, 4, 4)
    labels = torch.randint(0, 6, (2, 64, 64))
    masks = soft_class_masks(labels, 6, (4, 4))
    tokens = as_tokens(feats)
    assert torch.all(covariance_loss(tokens, tokens.clone()) == 0)
    assert torch.all(prototype_loss(feats, feats.clone(), masks).abs() < 1e-6)
    other = feats + torch.randn_like(feats)
    assert torch.all(covariance_loss(as_tokens(other), tokens) > 0)
    assert torch.all(prototype_loss(other, feats, masks) > 1e-3)


def test_relation_projection_starts_as_identity(net):
    tokens = torch.randn(2, 16, net.dims[-1])
    assert torch.all(covariance_loss(net.relation.project(tokens), tokens).abs() < 1e-10)


def test_graph_mask_is_the_8_neighbourhood():
    adj = grid_adjacency(3, 4)
    assert adj.shape == (12, 12) and adj.sum(dim=1).tolist() == [4, 6, 6, 4, 6, 9, 9, 6, 4, 6, 6, 4]


def test_objective_is_finite_for_every_subset_and_decreases():
    from medseg.train.losses import DiceCELoss
    from medseg.train.multiseq import TrainingMonitor, dmaf_losses

    torch.manual_seed(0)
    model = models.build("dmafnet", 3, 6, "small", **TINY)
    x = torch.randn(2, 3, 32, 32)
    y = torch.zeros(2, 32, 32, dtype=torch.long)
    y[:, 8:24, 8:24] = 2
    y[:, 12:20, 12:20] = 5
    x[:, :, 8:24, 8:24] += 2.0
    monitor = TrainingMonitor([0.6, 0.2, 0.4])
    loss_fn = DiceCELoss()
    for subset in SUBSETS:
        losses, weights = dmaf_losses(model, x, y, torch.tensor([subset, subset]), monitor, loss_fn, 0.5, 0.1)
        assert torch.isfinite(losses.total) and np.isclose(weights.sum(), 1.0)
    opt = torch.optim.AdamW(model.parameters(), 3e-3)
    first = last = None
    for step in range(8):
        present = torch.tensor([SUBSETS[step % 7], SUBSETS[(step + 3) % 7]])
        losses, _ = dmaf_losses(model, x, y, present, monitor, loss_fn, 0.5, 0.1)
        opt.zero_grad()
        losses.total.backward()
        opt.step()
        first = first if first is not None else float(losses.parts["teacher"])
        last = float(losses.parts["teacher"])
    assert last < 0.8 * first


def test_monitor_gates_reweights_and_slows_the_fastest_sequence():
    from medseg.train.multiseq import TrainingMonitor

    mon = TrainingMonitor([0.6, 0.2, 0.4])
    np.testing.assert_allclose(mon.availability, 1 / (np.array([0.4, 0.8, 0.6]) / (1 - 0.048)))
    gate = mon.observe(np.array([0.1, 0.5, 0.6]), np.array([True, True, True]))
    assert gate.tolist() == [0.0, 1.0, 1.0]  # lagging sequences (above-average gap) get the extra terms
    mon.end_epoch()
    assert np.isclose(np.linalg.norm(mon.beta), np.sqrt(3)) and mon.beta[0] < mon.beta[2]
    k = mon.gradient_scales()
    assert k[0] < 1.0 and k[2] == 1.0  # the fastest-converging sequence (smallest gap) is slowed


def test_fixed_allocation_follows_the_rates_and_is_never_empty():
    from medseg.train.multiseq import draw_patterns, fixed_allocation, presence_probability

    alloc = fixed_allocation(200, [0.6, 0.2, 0.4], seed=1037)
    assert alloc.shape == (200, 3) and alloc.any(axis=1).all()
    assert len({tuple(r) for r in alloc}) == 7
    draws = draw_patterns(np.random.default_rng(0), 4000, [0.6, 0.2, 0.4])
    assert draws.any(axis=1).all()
    np.testing.assert_allclose(draws.mean(axis=0), presence_probability([0.6, 0.2, 0.4]), atol=0.03)
    np.testing.assert_allclose(alloc.mean(axis=0), presence_probability([0.6, 0.2, 0.4]), atol=0.08)
