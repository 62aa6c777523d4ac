"""Each CM-CGNS loss against a case worked out by hand on tiny tensors (spec §8.4-§8.6, §11.7 item 11)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medseg.pretrain.losses import (
    Centroids,
    clusters_for,
    false_negative_loss,
    false_negative_mask,
    global_infonce,
    hard_negatives,
    local_image_loss,
    local_report_loss,
    masked_reconstruction_loss,
    random_token_mask,
)


def unit(deg: float) -> list[float]:
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def val(x: torch.Tensor) -> float:
    return float(x.detach())


def ce(logits: list[float], target: int) -> float:
    return -logits[target] + math.log(sum(math.exp(v) for v in logits))


def test_global_infonce_by_hand():
    image = t([unit(0), unit(90)])
    report = t([unit(60), unit(90)])
    # cosines: I0.R0 = 0.5, I0.R1 = 0, I1.R0 = cos 30, I1.R1 = 1; scale 10
    c30 = math.cos(math.radians(30))
    i2t = (ce([5.0, 0.0], 0) + ce([10 * c30, 10.0], 1)) / 2
    t2i = (ce([5.0, 10 * c30], 0) + ce([0.0, 10.0], 1)) / 2
    got = global_infonce(image, report, torch.tensor(math.log(10.0), dtype=torch.float64))
    assert val(got) == pytest.approx((i2t + t2i) / 2, rel=1e-9)


def test_local_image_loss_is_simsiam_with_stop_gradient():
    tokens = t([[unit(0), unit(90)]]).requires_grad_(True)  # (1, 2, 2)
    t2i = t([[unit(60), unit(90)]]).requires_grad_(True)
    # with h = identity both terms are the mean cosine: (cos 60 + cos 0) / 2 = 0.75
    assert float(local_image_loss(tokens, t2i, nn.Identity()).detach()) == pytest.approx(-0.75)
    h = nn.Linear(2, 2, bias=False).double()
    with torch.no_grad():
        h.weight.copy_(torch.tensor([[2.0, 0.5], [0.0, 1.0]]))
    local_image_loss(tokens, t2i, h).backward()
    # the targets are detached: each side gets gradient only through its own prediction h(.)
    a, b = tokens.detach().clone().requires_grad_(True), t2i.detach().clone().requires_grad_(True)
    (-0.5 * F.cosine_similarity(h(a), t2i.detach(), dim=-1).mean()).backward()
    (-0.5 * F.cosine_similarity(h(b), tokens.detach(), dim=-1).mean()).backward()
    assert torch.allclose(tokens.grad, a.grad) and torch.allclose(t2i.grad, b.grad)


def test_local_report_loss_without_centroids_is_plain_contrast():
    z1 = t([unit(0), unit(90)])
    z2 = t([unit(30), unit(90)])
    s = [[math.cos(math.radians(30)), 0.0], [math.cos(math.radians(60)), 1.0]]
    expected = (ce(s[0], 0) + ce(s[1], 1)) / 2
    out = local_report_loss(z1, z2)
    assert val(out["loss"]) == pytest.approx(expected, rel=1e-9)
    assert val(out["false_negative"]) == 0.0


CENTROIDS = t([unit(0), unit(30), unit(90), unit(180)])


def test_hard_negative_is_the_second_nearest_centroid():
    z1 = t([unit(10), unit(80), unit(170), unit(50)])
    own, hard, h = hard_negatives(z1, CENTROIDS * 3.0)  # centroid length does not matter: cosine
    assert own.tolist() == [0, 2, 3, 1]  # 10 deg -> 0 deg; 80 -> 90; 170 -> 180; 50 -> 30
    assert hard.tolist() == [1, 1, 2, 2]  # second nearest: 30 (20 deg away); 30 (50); 90 (80); 90 (40)
    assert torch.allclose(h, CENTROIDS[[1, 1, 2, 2]] * 3.0) and not h.requires_grad


def test_false_negative_mask_is_same_cluster_without_diagonal():
    mask = false_negative_mask(torch.tensor([0, 2, 0, 1, 2]))
    expected = torch.zeros(5, 5, dtype=torch.bool)
    expected[0, 2] = expected[2, 0] = expected[1, 4] = expected[4, 1] = True
    assert torch.equal(mask, expected)
    assert torch.equal(mask, mask.t()) and not mask.diagonal().any()


def test_false_negative_term_is_zero_inside_the_band_and_a_margin_outside():
    same = torch.tensor([[False, True, False], [True, False, False], [False, False, False]])
    # same-cluster gaps S_01 - S_00 = -0.3 and S_10 - S_11 = -0.4 lie in [-0.5, -0.2]; pair (0, 2) is in another cluster
    sim = t([[1.0, 0.7, 0.99], [0.6, 1.0, -0.9], [0.1, 0.2, 0.8]])
    assert val(false_negative_loss(sim, same)) == 0.0
    too_close = sim.clone()
    too_close[0, 1] = 0.95  # gap -0.05: ReLU(-0.05 + 0.2) = 0.15
    assert val(false_negative_loss(too_close, same)) == pytest.approx(0.15 / 9)
    too_far = sim.clone()
    too_far[1, 0] = 0.3  # gap -0.7: ReLU(0.7 - 0.5) = 0.2
    assert val(false_negative_loss(too_far, same)) == pytest.approx(0.2 / 9)


def test_local_report_loss_with_centroids_by_hand():
    z1 = t([unit(10), unit(80), unit(20)])
    z2 = t([unit(0), unit(70), unit(40)])
    n = 3
    s = [[math.cos(math.radians(a - b)) for b in (0, 70, 40)] for a in (10, 80, 20)]
    # own clusters: 10 -> c0, 80 -> c2, 20 -> c1 (30 deg); hard negatives: c1, c1, c0
    hard_angle = {0: 30, 1: 30, 2: 0}
    own_angle = {0: 0, 1: 90, 2: 30}
    assert [own_angle[a] for a in range(3)] == [0, 90, 30]
    logits = []
    for a, angle in enumerate((10, 80, 20)):
        row = list(s[a]) + [0.0] * n
        row[n + a] = 3.0 * math.cos(math.radians(angle - hard_angle[a]))  # own hard negative x3, the others' get logit 0
        logits.append(row)
    contrast = sum(ce(logits[a], a) for a in range(n)) / n
    # no two sentences share a cluster here, so the false-negative term is 0
    out = local_report_loss(z1, z2, CENTROIDS[:3])
    assert val(out["contrast"]) == pytest.approx(contrast, rel=1e-9)
    assert val(out["false_negative"]) == 0.0
    # "exclude" leaves the other rows' hard negatives out instead of giving them logit 0
    excl = sum(ce(list(s[a]) + [logits[a][n + a]], a) for a in range(n)) / n
    assert val(local_report_loss(z1, z2, CENTROIDS[:3], exclude_other_hard=True)["contrast"]) == pytest.approx(excl, rel=1e-9)


def test_same_cluster_pairs_get_the_margin_term_in_the_loss():
    z1 = t([unit(5), unit(-5), unit(95)])  # sentences 0 and 1 share centroid c0
    z2 = t([unit(5), unit(-5), unit(95)])  # S_01 = cos 10 deg: the gap -0.015 is too small -> margin 0.2 - 0.015
    out = local_report_loss(z1, z2, CENTROIDS[:3], fn_weight=1.0)
    gap = math.cos(math.radians(10)) - 1.0
    assert val(out["false_negative"]) == pytest.approx(2 * (gap + 0.2) / 9, rel=1e-9)
    assert val(out["loss"]) == pytest.approx(val(out["contrast"]) + val(out["false_negative"]), rel=1e-12)
    default = local_report_loss(z1, z2, CENTROIDS[:3])
    assert val(default["loss"]) == pytest.approx(val(default["contrast"]) + 1e-4 * val(default["false_negative"]), rel=1e-12)


def test_centroids_start_farthest_first_and_move_by_momentum_sum():
    points = t([unit(0), unit(10), unit(100), unit(170), unit(200)])
    c = Centroids(3, 2).double()
    c.start(points, first=0)
    # from 0 deg the least similar point is 170 (170 deg away); from 170 the least similar unpicked one is 10 (160 deg away)
    assert torch.allclose(c.centroids, points[[0, 3, 1]]) and c.active
    before = c.centroids.clone()
    batch = t([unit(2), unit(4), unit(195)])
    assign = c.update(batch)
    assert assign.tolist() == [0, 0, 1]
    assert torch.allclose(c.centroids[0], 0.999 * before[0] + 0.001 * (batch[0] + batch[1]))  # the sum, not the mean
    assert torch.allclose(c.centroids[1], 0.999 * before[1] + 0.001 * batch[2])
    assert torch.equal(c.centroids[2], before[2])  # an empty cluster keeps its value
    mean = Centroids(3, 2, update="mean").double()
    mean.start(points, first=0)
    mean.update(batch)
    assert torch.allclose(mean.centroids[0], 0.999 * before[0] + 0.001 * (batch[0] + batch[1]) / 2)


def test_masked_reconstruction_touches_only_masked_tokens():
    torch.manual_seed(0)
    target = torch.rand(2, 3, 4, 4) * 2 - 1
    raw = torch.rand(2, 3, 4, 4) * 2 - 1
    pred = raw.clone().requires_grad_(True)
    mask = torch.tensor([[[True, False], [False, True]], [[False, False], [True, False]]])  # 2x2 tokens of 2x2 pixels
    loss = masked_reconstruction_loss(pred, target, mask)
    pix = mask.repeat_interleave(2, 1).repeat_interleave(2, 2)  # (2, 4, 4)
    diffs = [abs(float(raw[b, c, y, x] - target[b, c, y, x])) for b in range(2) for c in range(3) for y in range(4) for x in range(4) if pix[b, y, x]]
    assert len(diffs) == 3 * 4 * 3  # three masked tokens of 4 pixels, 3 channels
    assert val(loss) == pytest.approx(10 * sum(diffs) / len(diffs), rel=1e-6)
    loss.backward()
    assert torch.all(pred.grad[~pix.unsqueeze(1).expand_as(pred)] == 0)
    assert torch.all(pred.grad[pix.unsqueeze(1).expand_as(pred)] != 0)
    changed = pred.detach().clone()
    changed[~pix.unsqueeze(1).expand_as(pred)] = 5.0  # anything at unmasked pixels
    assert val(masked_reconstruction_loss(changed, target, mask)) == pytest.approx(val(loss))


def test_random_token_mask_masks_half_of_each_sample():
    g = torch.Generator().manual_seed(0)
    mask = random_token_mask(4, (3, 4), 0.5, g)
    assert mask.shape == (4, 3, 4) and mask.sum(dim=(1, 2)).tolist() == [6, 6, 6, 6]
    assert random_token_mask(2, (1, 1), 0.5, g).all()  # at least one token


def test_clusters_scale_with_the_data():
    assert clusters_for(1_000) == 16 and clusters_for(10) == 2 and clusters_for(2_000_000) == 128
