"""TCSAFormer (spec §2): shapes, gradients, token budgets, Compressed-Attention invariants (§11.7 items 1-3)."""

from __future__ import annotations

import re

import pytest
import torch

from medseg.models import build, count_parameters
from medseg.models.blocks import load_matching_state_dict
from medseg.models.tcsaformer import (
    CompressedAttention,
    TCSAFormer,
    convert_official_state_dict,
    tcsa_budgets,
)

RATIOS = {"H/4": (0.5, 0.3), "H/8": (0.6, 0.2), "H/16": (0.7, 0.1), "H/32": (0.9, 0.1)}


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


# --------------------------------------------------------------------------- budgets (§2.3 table)
@pytest.mark.parametrize(
    "stage, n, n_keep, n_m, k",
    [
        ("H/4", 4096, 2048, 1433, 179),
        ("H/8", 1024, 614, 491, 61),
        ("H/16", 256, 179, 161, 20),
        ("H/32", 64, 57, 51, 6),
        ("H/4", 3136, 1568, 1097, 137),
        ("H/8", 784, 470, 376, 47),
        ("H/16", 196, 137, 123, 15),
        ("H/32", 49, 44, 39, 4),
    ],
)
def test_budget_table(stage, n, n_keep, n_m, k):
    b = tcsa_budgets(n, *RATIOS[stage])
    assert (b.n_keep, b.n_m, b.k) == (n_keep, n_m, k)
    assert b.r == n_keep - n_m and b == (n_keep, n_m, n_keep - n_m, k)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 9, 20])
def test_budgets_on_tiny_maps_stay_in_range(n):
    for keep, merge in RATIOS.values():
        b = tcsa_budgets(n, keep, merge)
        assert 1 <= b.k <= b.n_m <= b.n_keep <= n and 0 <= b.r <= b.n_keep // 2


# --------------------------------------------------------------------------- whole network
@pytest.fixture(scope="module")
def small_net() -> TCSAFormer:
    torch.manual_seed(0)
    return build("tcsaformer", in_channels=3, num_classes=2, config="small")






def test_batch_samples_are_independent(small_net):
    """Per-sample pruning/merging indices: a sample's output does not depend on its batch mates."""
    small_net.eval()
    x = torch.randn(3, 3, 64, 64)
    other = x.clone()
    other[1:] = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        together = small_net(x)
        alone = torch.cat([small_net(x[i : i + 1]) for i in range(3)])
        with_others_changed = small_net(other)
    small_net.train()
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    assert torch.equal(with_others_changed[0], together[0])


def test_bf16_autocast_forward(small_net):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = small_net(torch.randn(2, 3, 64, 64))
    assert y.shape == (2, 2, 64, 64) and torch.isfinite(y).all()


def test_gradients_reach_trainable_parameters_but_not_tcp_projections(small_net):
    small_net.zero_grad(set_to_none=True)
    small_net(torch.randn(2, 3, 64, 64)).square().mean().backward()
    frozen = re.compile(r"\.attn\.(k|global_token)\.weight$")
    for name, p in small_net.named_parameters():
        if frozen.search(name):
            assert p.grad is None, f"{name} must never receive a gradient (§2.3 quirk)"
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reached {name}"
    small_net.zero_grad(set_to_none=True)


def test_full_parameter_counts_and_drop_path_quirk():
    one = build("tcsaformer", num_classes=1, config="full")
    assert count_parameters(one) == 21_969_472
    assert count_parameters(build("tcsaformer", num_classes=9, config="full")) == 21_969_984
    rates = torch.linspace(0, 0.2, 14).tolist()
    dec = [[blk.drop_path.p for blk in stage] for stage in one.stages_de]
    assert dec[0] == pytest.approx(rates[0:8])
    assert dec[1] == pytest.approx(rates[2:4]) and dec[2] == pytest.approx(rates[4:6])
    enc = [blk.drop_path.p for stage in one.stages for blk in stage]
    assert enc == pytest.approx(rates)


def test_official_state_dict_keys_load(small_net):
    """Official key names (TCSAFormer.stages.0.0.mlp..., upsample_layers.i.0, output) map onto ours."""
    ours = small_net.state_dict()
    inverse = [
        (r"\.ffn\.", ".mlp."),
        (r"^upsample_layers\.(\d+)\.([12])\.", lambda m: f"upsample_layers.{m[1]}.{int(m[2]) - 1}."),
        (r"^skip_layers\.(\d+)\.channel\.", r"skip_layers.\1.channel_attention."),
        (r"^skip_layers\.(\d+)\.spatial\.", r"skip_layers.\1.spatial_attention."),
        (r"^head\.1\.", "output."),
    ]
    official = {}
    for key, value in ours.items():
        for pattern, repl in inverse:
            key = re.sub(pattern, repl, key)
        official["TCSAFormer." + key] = value + 1 if value.is_floating_point() else value
    target = build("tcsaformer", config="small")
    loaded, skipped = load_matching_state_dict(target, convert_official_state_dict(official))
    assert not skipped and len(loaded) == len(ours)
    torch.testing.assert_close(target.head[1].weight, small_net.head[1].weight + 1)


# --------------------------------------------------------------------------- Compressed Attention invariants
def _attention(dim=16, heads=2, keep=0.5, merge=0.3) -> CompressedAttention:
    ca = CompressedAttention(dim, heads, keep, merge)
    for lin in (ca.qkv, ca.proj, ca.k, ca.global_token):
        torch.nn.init.normal_(lin.weight, std=0.3)
    torch.nn.init.normal_(ca.proj.bias, std=0.1)
    return ca


def _reference_compressed_attention(ca: CompressedAttention, x: torch.Tensor) -> torch.Tensor:
    """§2.3 (a)-(d) written out literally, with a dense masked top-k soft-max (the official formulation)."""
    b, h, w, c = x.shape
    n = h * w
    n_keep, n_m, r, k = tcsa_budgets(n, ca.keep_ratio, ca.merge_ratio)
    x = x.reshape(b, n, c)
    out = torch.zeros_like(x)
    for i in range(b):
        xi = x[i]
        g = ca.global_token(xi.mean(0))
        k0 = ca.k(xi)
        order = torch.sort(((k0 @ g) * ca.scale).softmax(-1), descending=True).indices  # as the official code
        keep = order[:n_keep]
        kept, metric = xi[keep], torch.nn.functional.normalize(k0[keep], dim=-1)
        a_pos, b_pos = list(range(0, n_keep, 2)), list(range(1, n_keep, 2))
        sim = metric[a_pos] @ metric[b_pos].T
        best, dst = sim.max(-1)
        rank = torch.argsort(best, descending=True).tolist()
        merged_a, unmerged_a = rank[:r], rank[r:]
        b_rows = []
        for j, bp in enumerate(b_pos):
            group = [kept[bp]] + [kept[a_pos[a]] for a in merged_a if dst[a] == j]
            b_rows.append(torch.stack(group).mean(0))
        xm = torch.stack([kept[a_pos[a]] for a in unmerged_a] + b_rows)
        assert xm.shape[0] == n_m
        q, kk, v = ca.qkv(xm).reshape(n_m, 3, ca.num_heads, ca.head_dim).permute(1, 2, 0, 3)
        logits = q @ kk.transpose(-2, -1) * ca.scale
        thresh = logits.topk(k, dim=-1).values[..., -1:]
        attn = logits.masked_fill(logits < thresh, float("-inf")).softmax(-1)
        xa = (attn @ v).transpose(0, 1).reshape(n_m, c)
        restored = torch.zeros(n_keep, c)
        for row, a in enumerate(unmerged_a):
            restored[a_pos[a]] = xa[row]
        for j, bp in enumerate(b_pos):
            restored[bp] = xa[len(unmerged_a) + j]
        for a in merged_a:
            restored[a_pos[a]] = xa[len(unmerged_a) + dst[a]]
        full = xi.clone()  # pruned tokens keep their input (shortcut)
        full[keep] = restored
        out[i] = ca.proj(full)
    return out.reshape(b, h, w, c)


def test_compressed_attention_matches_literal_reference():
    ca = _attention()
    x = torch.randn(2, 8, 7, 16)  # N = 56: odd |A|, batch of 2
    with torch.no_grad():
        torch.testing.assert_close(ca(x), _reference_compressed_attention(ca, x), atol=1e-5, rtol=1e-5)


def test_pruned_tokens_skip_attention():
    """§11.7-1: pruned positions output proj(own input); with indices fixed, a pruned token affects nothing else."""
    ca = _attention()
    x = torch.randn(2, 8, 8, 16)
    with torch.no_grad():
        out, info = ca(x, return_info=True)
        plan = info["plan"]
        tokens, flat = x.reshape(2, 64, 16), out.reshape(2, 64, 16)
        for i in range(2):
            pruned = sorted(set(range(64)) - set(plan.keep_idx[i].tolist()))
            assert len(pruned) == 64 - info["budgets"].n_keep == 32
            torch.testing.assert_close(flat[i, pruned], ca.proj(tokens[i, pruned]))
        target = pruned[3]  # of sample 1
        x2 = x.clone()
        x2.view(2, 64, 16)[1, target] += torch.randn(16)
        out2 = ca(x2, plan=plan).reshape(2, 64, 16)
    changed = (out2 - flat).abs().amax(-1) > 0
    assert changed[1, target] and changed.sum() == 1


def test_merged_pairs_get_identical_outputs():
    """§11.7-2: a token merged into its destination receives exactly the destination's output."""
    ca = _attention()
    x = torch.randn(2, 8, 8, 16)
    with torch.no_grad():
        out, info = ca(x, return_info=True)
    plan, flat = info["plan"], out.reshape(2, 64, 16)
    assert plan.merged_src.shape == (2, info["budgets"].r) and info["budgets"].r > 0
    for i in range(2):
        src_tok = plan.keep_idx[i, 2 * plan.merged_src[i]]
        dst_tok = plan.keep_idx[i, 2 * plan.merged_dst[i] + 1]
        torch.testing.assert_close(flat[i, src_tok], flat[i, dst_tok], atol=0, rtol=0)
        # the remaining kept tokens are all distinct
        kept_rows = flat[i, plan.keep_idx[i]]
        distinct = torch.unique(kept_rows.round(decimals=5), dim=0).shape[0]
        assert distinct == info["budgets"].n_m


def test_each_query_attends_exactly_k_keys():
    """§11.7-3: k keys per query as in the §2.3 table; values outside a query's top-k do not affect it."""
    ca = _attention(dim=32, heads=2, keep=0.7, merge=0.1)
    with torch.no_grad():
        _, info = ca(torch.randn(2, 16, 16, 32), return_info=True)
    idx = info["topk_idx"]
    assert info["budgets"] == (179, 161, 18, 20)
    assert idx.shape == (2, 2, 161, 20)
    assert (idx.sort(-1).values.diff(dim=-1) > 0).all()  # k distinct keys per row

    q, k, v = torch.randn(3, 2, 2, 40, 8).unbind(0)
    out, sel = ca.attend(q, k, v, 5)
    assert sel.shape == (2, 2, 40, 5)
    query = (1, 0, 7)
    outside = sorted(set(range(40)) - set(sel[query].tolist()))[0]
    inside = sel[query][0].item()
    for token, should_change in ((outside, False), (inside, True)):
        v2 = v.clone()
        v2[query[0], query[1], token] += 10.0
        out2, _ = ca.attend(q, k, v2, 5)
        assert torch.equal(out2[query], out[query]) != should_change
