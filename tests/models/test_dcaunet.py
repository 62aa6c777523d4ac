"""DCAU-Net (spec §1): shapes, gradients, parameter count, Differential Cross Attention (§1.3, §11.7 item 6)."""

from __future__ import annotations

import math

import pytest
import torch

from medseg.models import build, count_parameters
from medseg.models.dcaunet import DCAUNet, DifferentialCrossAttention, lambda_init_schedule


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on a shared 2-core machine this is faster than oversubscribing."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def small_net() -> DCAUNet:
    torch.manual_seed(0)
    return build("dcaunet", in_channels=3, num_classes=2, config="small")






def test_bf16_autocast_forward(small_net):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = small_net(torch.randn(2, 3, 64, 64))
    assert y.shape == (2, 2, 64, 64) and torch.isfinite(y).all()


def test_gradients_reach_every_parameter(small_net):
    small_net.zero_grad(set_to_none=True)
    small_net(torch.randn(2, 3, 64, 64)).square().mean().backward()
    for name, p in small_net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reached {name}"
    small_net.zero_grad(set_to_none=True)


def test_full_parameter_count_and_layer_schedule():
    full = build("dcaunet", num_classes=9, config="full")
    assert count_parameters(full) == 23_877_312  # §1.6 (our config's own figure)
    layers = full.dca_layers()
    assert len(layers) == 26
    assert [layer.lambda_init for layer in layers] == pytest.approx([lambda_init_schedule(l) for l in range(1, 27)])
    assert [layer.num_heads for layer in layers[:14]] == [1, 1, 2, 2] + [4] * 8 + [8, 8]
    rates = [blk.drop_path.p for stage in list(full.stages) + list(full.stages_de) for blk in stage]
    assert rates == pytest.approx(torch.linspace(0, 0.1, 26).tolist())


def test_lambda_init_rule():
    assert lambda_init_schedule(1) == pytest.approx(0.2)
    assert lambda_init_schedule(26) == pytest.approx(0.8 - 0.6 * math.exp(-7.5))


# --------------------------------------------------------------------------- DCA
def _dca(dim=32, head_dim=8, grid=7, lambda_init=0.3) -> DifferentialCrossAttention:
    dca = DifferentialCrossAttention(dim, head_dim, grid, lambda_init)
    for lin in (dca.q_proj, dca.k_proj, dca.v_proj, dca.out_proj):
        torch.nn.init.normal_(lin.weight, std=0.3)
    torch.nn.init.normal_(dca.out_proj.bias, std=0.1)
    torch.nn.init.normal_(dca.subln.weight, mean=1.0, std=0.2)
    return dca


def _window_means(x: torch.Tensor, grid: int) -> torch.Tensor:
    """Explicit G x G window averages of a (B, H, W, C) map whose sides are multiples of ``grid``."""
    b, h, w, c = x.shape
    return x.reshape(b, grid, h // grid, grid, w // grid, c).mean(dim=(2, 4)).reshape(b, grid * grid, c)


def _reference(dca: DifferentialCrossAttention, x: torch.Tensor, lam: float | None) -> torch.Tensor:
    """Per head: softmax maps A_1, A_2 over the summaries written out; ``lam=None`` -> only A_1 (one softmax)."""
    b, h, w, c = x.shape
    d, nh = dca.head_dim, dca.num_heads
    s = _window_means(x, dca.grid)
    q, k, v = dca.q_proj(x.reshape(b, h * w, c)), dca.k_proj(s), dca.v_proj(s)
    heads = []
    for i in range(nh):
        q1, q2 = q[..., (2 * i) * d : (2 * i + 1) * d], q[..., (2 * i + 1) * d : (2 * i + 2) * d]
        k1, k2 = k[..., (2 * i) * d : (2 * i + 1) * d], k[..., (2 * i + 1) * d : (2 * i + 2) * d]
        vi = v[..., i * 2 * d : (i + 1) * 2 * d]
        a1 = torch.softmax(q1 @ k1.transpose(1, 2) / math.sqrt(d), dim=-1)  # (B, N, M)
        o = a1 @ vi
        if lam is not None:
            a2 = torch.softmax(q2 @ k2.transpose(1, 2) / math.sqrt(d), dim=-1)
            o = (a1 - lam * a2) @ vi
        o = o * torch.rsqrt(o.square().mean(-1, keepdim=True) + 1e-5) * dca.subln.weight
        heads.append(o * (1 - dca.lambda_init))
    return dca.out_proj(torch.cat(heads, dim=-1)).reshape(b, h, w, c)


def test_dca_with_lambda_zero_is_one_softmax_attention():
    """§11.7-6: with lambda = 0, DCA equals one soft-max attention of pixel queries over window summaries."""
    dca = _dca()
    d = dca.head_dim
    with torch.no_grad():  # exp(0) - exp(ln(1 + lambda_init)) + lambda_init = 0
        dca.lambda_q1.zero_()
        dca.lambda_k1.zero_()
        dca.lambda_q2.fill_(math.sqrt(math.log(1 + dca.lambda_init) / d))
        dca.lambda_k2.fill_(math.sqrt(math.log(1 + dca.lambda_init) / d))
        assert abs(dca.lambda_full().item()) < 1e-6
        x = torch.randn(2, 14, 21, 32)
        torch.testing.assert_close(dca(x), _reference(dca, x, lam=None), atol=1e-5, rtol=1e-5)


def test_dca_is_the_difference_of_two_softmax_maps():
    dca = _dca()
    with torch.no_grad():
        x = torch.randn(2, 14, 14, 32)
        lam = dca.lambda_full().item()
        assert lam == pytest.approx(
            math.exp((dca.lambda_q1 @ dca.lambda_k1).item()) - math.exp((dca.lambda_q2 @ dca.lambda_k2).item()) + 0.3
        )
        torch.testing.assert_close(dca(x), _reference(dca, x, lam=lam), atol=1e-5, rtol=1e-5)


def test_dca_summary_tokens_and_small_maps():
    dca = _dca()
    x = torch.randn(1, 14, 28, 32)
    torch.testing.assert_close(dca.summary_tokens(x), _window_means(x, 7))
    tiny = torch.randn(2, 3, 5, 32)  # smaller than the 7 x 7 grid: every pixel is a summary token
    torch.testing.assert_close(dca.summary_tokens(tiny), tiny.reshape(2, 15, 32))
    assert dca(tiny).shape == tiny.shape


def test_dca_cost_is_linear_in_pixels():
    """Keys/values are the G^2 summaries: attention MACs grow linearly with N (no N x N map)."""
    from torch.utils.flop_counter import FlopCounterMode

    dca = _dca()

    def macs(side: int) -> int:
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            dca(torch.randn(1, side, side, 32))
        return counter.get_total_flops()

    assert macs(56) / macs(28) == pytest.approx(4.0, rel=0.02)
