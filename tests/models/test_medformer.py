"""MedFormer (SEED_METHODS §3): shapes, gradients, DSSA budgets and invariants §11.7 (4, 5), parameter counts."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten
from torch.utils._python_dispatch import TorchDispatchMode

from medseg.models import build, count_parameters
from medseg.models.medformer import (
    DSSA,
    AttentionLePE,
    MedFormerSeg,
    dssa_budget,
    dual_sparse_attention,
    medformer_classifier,
    route_regions,
)


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor (by element count) any op produces, views included."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.fixture(scope="module")
def small_model() -> MedFormerSeg:
    torch.manual_seed(0)
    return build("medformer", in_channels=3, num_classes=3, config="small")


# --------------------------------------------------------------------------- shapes and gradients


def test_batch_and_small_input(small_model):
    model = small_model.eval()
    x = torch.randn(3, 3, 70, 90)  # padded to 128 x 128 (16 * n_win) and cropped back
    with torch.no_grad():
        out = model(x)
        single = model(x[1:2])
    assert out.shape == (3, 3, 70, 90)
    torch.testing.assert_close(out[1:2], single, atol=1e-5, rtol=1e-4)


def test_gradients_reach_every_parameter(small_model):
    model = small_model.train()
    model.zero_grad()
    x = torch.randn(2, 3, 128, 128)
    target = torch.randint(0, 3, (2, 128, 128))
    F.cross_entropy(model(x), target).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_classifier_shapes():
    torch.manual_seed(0)
    model = medformer_classifier("tiny", num_classes=5).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 112, 112)).shape == (2, 5)
        assert model(torch.randn(1, 1, 112, 112)).shape == (1, 5)


# --------------------------------------------------------------------------- budgets and invariant 4
@pytest.mark.parametrize(
    ("side", "n_win", "regions"),
    [(224, 7, [(8, 8), (4, 4), (2, 2)]), (256, 8, [(8, 8), (4, 4), (2, 2)])],
)
def test_published_budgets(side, n_win, regions):
    """§3.3: region sizes 8x8, 4x4, 2x2 and k2 = 8 in all three stages at the published sizes."""
    for stage, (topk, region) in enumerate(zip((1, 4, 16), regions)):
        s = side // 2 ** (stage + 2)
        budget = dssa_budget(s, s, n_win, topk)
        assert budget.region_size == region
        assert budget.grid == (n_win, n_win)
        assert (budget.k1, budget.k2) == (topk, 8)


def test_invariant4_each_query_routes_k1_regions_and_attends_k2_tokens(small_model):
    """§11.7 (4) on a 300 x 260 input (padded to 320 x 288): budgets as computed for each stage."""
    model = small_model.eval()
    dssas = model.backbone.dssa_modules()
    assert len(dssas) == 3  # small config: one DSSA block in each of stages 1-3
    for m in dssas:
        m.record_info = True
    try:
        with torch.no_grad():
            model(torch.randn(2, 3, 300, 260))
        # expected, by hand: map (h, w) -> region (h // 8, w // 8), grid ceil(side / region), k2 = k1 * a // 8
        expected = [
            ((80, 72), (10, 9), (8, 8), 1, 11),
            ((40, 36), (5, 4), (8, 9), 4, 10),
            ((20, 18), (2, 2), (10, 9), 16, 8),
        ]
        for m, (size, region, grid, k1, k2) in zip(dssas, expected):
            info = m.last_info
            assert info is not None
            assert info.budget == dssa_budget(*size, n_win=8, topk=m.topk)
            assert (info.budget.region_size, info.budget.grid, info.budget.k1, info.budget.k2) == (region, grid, k1, k2)
            r, a = grid[0] * grid[1], region[0] * region[1]
            # each query region routes to exactly k1 distinct regions
            assert info.region_idx.shape == (2, r, k1)
            assert ((info.region_idx >= 0) & (info.region_idx < r)).all()
            assert (info.region_idx.sort(-1).values.diff(dim=-1) > 0).all()
            # each query attends exactly k2 distinct tokens among its k1 * a candidates
            assert info.token_idx.shape == (2, m.num_heads, r, a, k2)
            assert ((info.token_idx >= 0) & (info.token_idx < k1 * a)).all()
            if k2 > 1:
                assert (info.token_idx.sort(-1).values.diff(dim=-1) > 0).all()
    finally:
        for m in dssas:
            m.record_info, m.last_info = False, None


def _dssa_reference(q, k, v, region_idx, budget, heads, scale):
    """§3.3 steps 3-6 written directly: loops over query regions, candidates = routed regions' tokens."""
    b, c, h, w = q.shape
    rh, rw = budget.region_size
    gh, gw = budget.grid
    pad = (0, gw * rw - w, 0, gh * rh - h)
    q, k, v = (F.pad(t, pad).reshape(b, heads, c // heads, gh * rh, gw * rw) for t in (q, k, v))

    def tokens(t, bi, hi, region):  # (a, d) tokens of one region, row-major inside the region
        i, j = divmod(int(region), gw)
        return t[bi, hi, :, i * rh : (i + 1) * rh, j * rw : (j + 1) * rw].reshape(c // heads, -1).T

    out = torch.zeros_like(q)
    for bi in range(b):
        for hi in range(heads):
            for rho in range(gh * gw):
                qr = tokens(q, bi, hi, rho)
                kc = torch.cat([tokens(k, bi, hi, g) for g in region_idx[bi, rho]])
                vc = torch.cat([tokens(v, bi, hi, g) for g in region_idx[bi, rho]])
                logits = scale * qr @ kc.T
                val, idx = logits.topk(budget.k2, dim=-1)
                o = (val.softmax(-1).unsqueeze(-1) * vc[idx]).sum(1)  # (a, d)
                i, j = divmod(rho, gw)
                out[bi, hi, :, i * rh : (i + 1) * rh, j * rw : (j + 1) * rw] = o.T.reshape(-1, rh, rw)
    return out.reshape(b, c, gh * rh, gw * rw)[:, :, :h, :w]


def test_dssa_matches_direct_reference():
    """The batched region/token gathers equal a direct per-region computation (with padding)."""
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 16, 11, 9).unbind(0)
    budget = dssa_budget(11, 9, n_win=4, topk=3)  # region 2x2, grid 6x5, padded, k2 = 1
    budget = type(budget)(budget.region_size, budget.grid, budget.k1, 5)  # a larger k2 exercises the soft-max
    idx, _ = route_regions(q, k, budget)
    out, _ = dual_sparse_attention(q, k, v, idx, budget, heads=2, scale=16**-0.5)
    ref = _dssa_reference(q, k, v, idx, budget, heads=2, scale=16**-0.5)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- invariant 5
def test_invariant5_routing_gets_no_gradient():
    torch.manual_seed(0)
    m = DSSA(dim=32, num_heads=2, n_win=4, topk=2)
    m.record_info = True
    x = torch.randn(2, 16, 16, 32, requires_grad=True)
    loss = m(x).square().sum()
    loss.backward()
    info = m.last_info
    assert not info.region_scores.requires_grad and info.region_scores.grad_fn is None
    full_grad = m.qkv_linear.weight.grad.clone()

    # the same computation with the routing held fixed as a constant: identical gradients, so the routing
    # scores path contributes nothing
    m.zero_grad()
    xc = x.detach().permute(0, 3, 1, 2)
    q, k, v = m.qkv_linear(xc).chunk(3, dim=1)
    out, _ = dual_sparse_attention(q, k, v, info.region_idx, info.budget, m.num_heads, m.scale)
    out = m.output_linear(out + m.lepe(v))
    out.permute(0, 2, 3, 1).square().sum().backward()
    torch.testing.assert_close(m.qkv_linear.weight.grad, full_grad, atol=1e-5, rtol=1e-5)

    # while the attended values (and queries/keys through the kept logits) do receive gradients
    gq, gk, gv = full_grad.chunk(3, dim=0)
    assert gv.abs().sum() > 0 and gq.abs().sum() > 0 and gk.abs().sum() > 0


# --------------------------------------------------------------------------- efficiency
def test_dssa_never_forms_dense_token_matrix():
    torch.manual_seed(0)
    m = DSSA(dim=32, num_heads=1, n_win=8, topk=1).eval()
    n, c = 64 * 64, 32
    budget = dssa_budget(64, 64, n_win=8, topk=1)
    with torch.no_grad(), _LargestTensor() as rec:
        m(torch.randn(1, 64, 64, c))
    # the largest tensors are the qkv maps (N x 3C), the candidate logits (N x k1*a per head) and the gathered
    # top-k2 values (N x k2 x C); nothing of size N x N
    assert rec.largest <= max(n * 3 * c, n * budget.k1 * budget.area, n * budget.k2 * c)
    assert rec.largest < n * n / 4


def test_stage4_attention_is_mhsa_plus_lepe_on_x():
    torch.manual_seed(0)
    m = AttentionLePE(64, num_heads=8)
    x = torch.randn(2, 5, 6, 64)
    b, h, w, c = x.shape
    qkv = (x.reshape(b, h * w, c) @ m.qkv.weight.T).reshape(b, h * w, 3, 8, 8).permute(2, 0, 3, 1, 4)
    attn = (qkv[0] @ qkv[1].transpose(-1, -2) * 8**-0.5).softmax(-1)
    o = (attn @ qkv[2]).transpose(1, 2).reshape(b, h, w, c)
    o = o + m.lepe(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    torch.testing.assert_close(m(x), m.proj(o), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- parameter counts (§3.8)
@pytest.mark.parametrize(("variant", "expected"), [("tiny", 3_456_360), ("small", 13_142_760), ("base", 29_060_200)])
def test_classification_parameter_counts(variant, expected):
    assert count_parameters(medformer_classifier(variant, num_classes=1000)) == expected


def test_segmentation_parameter_counts():
    isic = build("medformer", 3, 1, "full", variant="small", channels=64, n_win=8)
    assert count_parameters(isic) == 13_491_649
    synapse = build("medformer", 3, 9, "full")
    assert count_parameters(synapse) == 31_281_225
    assert count_parameters(synapse.decode_head) == 2_988_681
    assert math.isclose(count_parameters(build("medformer", 3, 2, "small")), 1.5e6, rel_tol=0.1)
