"""MSLAU-Net (SEED_METHODS §4): shapes, gradients, MSLA layouts (§4.9), invariant §11.7 (7), parameter count."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten
from torch.utils._python_dispatch import TorchDispatchMode

from medseg.models import build, count_parameters
from medseg.models.mslaunet import MSLA, LinearAttention, MSLAUNet


class _TensorSizes(TorchDispatchMode):
    """Records the largest tensor any op produces and whether any has two axes of length ``n``."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n, self.largest, self.square = n, 0, False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
                self.square |= sum(s == self.n for s in t.shape) >= 2
        return out


@pytest.fixture(scope="module")
def small_model() -> MSLAUNet:
    torch.manual_seed(0)
    return build("mslaunet", in_channels=3, num_classes=3, config="small")


# --------------------------------------------------------------------------- shapes and gradients


@pytest.mark.parametrize("layout", ["spatial", "official"])
def test_batch_and_non_square_input(layout):
    torch.manual_seed(0)
    model = build("mslaunet", 3, 4, "small", layout=layout).eval()
    x = torch.randn(3, 3, 70, 100)  # padded to 96 x 128: non-square maps in every stage
    with torch.no_grad():
        out = model(x)
        single = model(x[2:3])
    assert out.shape == (3, 4, 70, 100)
    torch.testing.assert_close(out[2:3], single, atol=1e-5, rtol=1e-4)


def test_gradients_reach_every_parameter(small_model):
    model = small_model.train()
    model.zero_grad()
    x = torch.randn(2, 3, 64, 96)
    F.cross_entropy(model(x), torch.randint(0, 3, (2, 64, 96))).backward()
    unused = {"encoder.norm.weight", "encoder.norm.bias", "encoder.head.weight", "encoder.head.bias"}
    for name, p in model.named_parameters():
        if name in unused:  # the official encoder's classification head, never used for segmentation
            assert p.grad is None, name
            continue
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert {n for n, _ in model.named_parameters()} >= unused


def test_msla_shares_one_linear_attention():
    m = MSLA(64, 1)
    assert sum(isinstance(mod, LinearAttention) for mod in m.modules()) == 1
    assert torch.equal(m.scale_weights.detach(), torch.ones(4))


# --------------------------------------------------------------------------- invariant 7
@pytest.mark.parametrize("layout", ["spatial", "official"])
def test_invariant7_linear_attention_equals_quadratic(layout):
    """§11.7 (7): the e x e context computation equals (Q~ K~^T) V with the N x N matrix formed explicitly."""
    torch.manual_seed(0)
    la = LinearAttention(dim=32, num_heads=2)
    x = torch.randn(2, 63, 32)
    b, n, d = x.shape
    q, k, v = (x @ la.qkv.weight.T).reshape(b, n, 3, 2, 16).permute(2, 0, 3, 1, 4)
    q_t, k_t = q.softmax(dim=-2), k.softmax(dim=-1)  # queries over tokens, keys over channels
    attn = q_t @ k_t.transpose(-2, -1)  # (B, h, N, N), explicitly quadratic
    u = attn @ v
    u = u.reshape(b, n, d) if layout == "official" else u.transpose(1, 2).reshape(b, n, d)
    torch.testing.assert_close(la(x, layout), la.proj(u), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["spatial", "official"])
def test_invariant7_msla_never_forms_token_by_token_tensor(layout):
    torch.manual_seed(0)
    m = MSLA(64, 1, layout).eval()
    largest = {}
    for side in (16, 32):
        n = side * side
        with torch.no_grad(), _TensorSizes(n) as rec:
            m(torch.randn(1, side, side, 64))
        assert not rec.square, "an N x N tensor was formed"
        assert rec.largest < n * n
        largest[side] = rec.largest
    assert largest[32] <= 4 * largest[16]  # memory linear in N (4x the tokens, at most 4x the largest tensor)


# --------------------------------------------------------------------------- layouts (§4.4, §4.9)
def _msla_reference(m: MSLA, x: torch.Tensor, layout: str) -> torch.Tensor:
    """MSLA written from §4.4 steps 1-6 with explicit flat-index formulas (one sample at a time)."""
    bsz, h, w, c = x.shape
    n, d = h * w, c // 4
    heads = m.linear_attention.num_heads
    e = d // heads
    la = m.linear_attention
    ar = torch.arange
    outs = []
    for b in range(bsz):
        tok = x[b].reshape(n, c)  # T[n, c], n = i * W + j
        if layout == "official":
            t = tok.flatten()  # t[n * C + c] = T[n, c]
            cc, ii, jj = torch.meshgrid(ar(c), ar(h), ar(w), indexing="ij")
            z = t[cc * n + ii * w + jj]  # step 1: Z[c', i, j] = t[c' * N + i * W + j]
        else:
            cc, ii, jj = torch.meshgrid(ar(c), ar(h), ar(w), indexing="ij")
            z = tok[ii * w + jj, cc]  # Z[c, i, j] = T[i * W + j, c]
        branches = (m.dw_conv_3x3, m.dw_conv_5x5, m.dw_conv_7x7, m.dw_conv_9x9)
        maps = []
        for g, (branch, ksz) in enumerate(zip(branches, (3, 5, 7, 9))):
            zg = z[g * d : (g + 1) * d]
            conv = branch.depthwise
            yg = F.relu(zg + F.conv2d(zg[None], conv.weight, conv.bias, padding=ksz // 2, groups=d)[0])
            y = yg.reshape(d, n).T  # y_n = Y_g[:, n]
            q, k, v = (y @ la.qkv.weight.T).split(d, dim=1)
            us = []
            for eta in range(heads):
                sl = slice(eta * e, (eta + 1) * e)
                k_t = k[:, sl].softmax(dim=1)
                q_t = q[:, sl].softmax(dim=0)
                us.append(q_t @ (k_t.T @ v[:, sl]))  # U_eta (N, e)
            if layout == "official":
                uu = torch.stack(us)  # (h, N, e)
                flat = torch.empty(heads * n * e)
                eta, mm, ff = torch.meshgrid(ar(heads), ar(n), ar(e), indexing="ij")
                flat[(eta * n + mm) * e + ff] = uu[eta, mm, ff]  # u[(eta * N + m) * e + f] = U_eta[m, f]
                nn_, cc_ = torch.meshgrid(ar(n), ar(d), indexing="ij")
                u_merged = flat[nn_ * d + cc_]  # U'[n, c] = u[n * D + c]
            else:
                u_merged = torch.cat(us, dim=1)
            la_out = u_merged @ la.proj.weight.T + la.proj.bias  # (N, D)
            maps.append(m.scale_weights[g] * la_out.T.reshape(d, h, w))
        o = F.conv2d(torch.cat(maps)[None], m.final_conv.weight, m.final_conv.bias)[0]  # (C, H, W)
        if layout == "official":
            flat = torch.empty(c * n)
            cc, ss = torch.meshgrid(ar(c), ar(n), indexing="ij")
            flat[cc * n + ss] = o.reshape(c, n)[cc, ss]  # o[c' * N + s] = O[c', s]
            nn_, cc_ = torch.meshgrid(ar(n), ar(c), indexing="ij")
            r = flat[nn_ * c + cc_]  # step 6: R[n, c] = o[n * C + c]
        else:
            r = o.reshape(c, n).T  # R[n, c] = O[c, n]
        outs.append(r.reshape(h, w, c))
    return torch.stack(outs)


@pytest.mark.parametrize("layout", ["spatial", "official"])
def test_msla_layout_matches_flat_index_reference(layout):
    torch.manual_seed(0)
    m = MSLA(64, 2, layout)  # D = 16, two heads of width 8: the head merge matters
    with torch.no_grad():
        m.scale_weights.copy_(torch.tensor([0.5, 1.0, 1.5, 2.0]))
        x = torch.randn(2, 6, 10, 64)  # non-square map
        torch.testing.assert_close(m(x), _msla_reference(m, x, layout), atol=1e-5, rtol=1e-5)


def test_official_layout_differs_from_spatial():
    torch.manual_seed(0)
    spatial = MSLA(64, 2, "spatial")
    official = MSLA(64, 2, "official")
    official.load_state_dict(spatial.state_dict())
    x = torch.randn(2, 6, 10, 64)
    with torch.no_grad():
        assert (spatial(x) - official(x)).abs().max() > 1e-2


# --------------------------------------------------------------------------- parameter count (§4.6)
def test_full_parameter_count():
    model = build("mslaunet", 3, 9, "full")
    assert count_parameters(model) == 21_896_778
    assert count_parameters(model.encoder) == 21_357_505
    assert count_parameters(model.conv_mla) == 370_560
    assert count_parameters(model.mlahead) == 147_968
