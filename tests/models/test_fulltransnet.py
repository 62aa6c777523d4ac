"""FullTransNet (spec §7): shapes, the local + global sparse attention pattern, decoding and frame scores."""

from __future__ import annotations

import pytest
import torch

from medseg import models
from medseg.models.fulltransnet import LocalGlobalAttention, frame_scores, pointer_loss, segment_global_mask


pytestmark = pytest.mark.usefixtures("one_thread")


def test_registered_as_a_sequence_model_not_a_segmentation_network():
    assert "fulltransnet" in models.names(None) and "fulltransnet" not in models.names()
    assert models.card("fulltransnet").kind == "sequence"


def test_forward_and_decode_shapes():
    m = models.build("fulltransnet", in_channels=20, config="small").eval()
    x = torch.randn(2, 50, 20)
    targets = torch.tensor([[3, 10, 20, -1], [1, 2, 3, 4]])
    logits = m(x, targets, lengths=torch.tensor([50, 40]))
    assert logits.shape == (2, 4, 50)
    assert torch.isinf(logits[1, :, 40:]).all()  # padding frames are never pointed at
    picks, probs = m.decode(x, 8)
    assert picks.shape == (2, 8) and probs.shape == (2, 8, 50)
    for row in picks:
        chosen = row[row >= 0]
        assert (chosen[1:] > chosen[:-1]).all()  # monotone pointer
    torch.testing.assert_close(probs.sum(-1), (picks >= 0).float())  # a distribution per step until no later frame is left
    with pytest.raises(ValueError, match="exceeds"):
        m.decode(torch.randn(1, 129, 20), 3)


def _pattern(window=3, length=40, lengths=(30, 25), segment=8):
    att = LocalGlobalAttention(16, 2, window, dropout=0.0).eval()
    x = torch.randn(len(lengths), length, 16)
    valid = torch.arange(length)[None] < torch.tensor(lengths)[:, None]
    glob = torch.stack([segment_global_mask(n, segment, length) for n in lengths])
    return att, x, valid, glob


def test_sparse_attention_local_window_plus_global_tokens():
    w = 3
    att, x, valid, glob = _pattern(w)
    out, dense = att(x, valid, glob, return_weights=True)
    for b in range(x.shape[0]):
        n = int(valid[b].sum())
        g = set(torch.nonzero(glob[b]).flatten().tolist())
        for i in range(x.shape[1]):
            row = dense[b, :, i]
            nz = set(torch.nonzero(row.abs().sum(0) > 0).flatten().tolist())
            if i >= n:
                assert not nz and out[b, i].abs().max() == 0  # padding queries output 0
            elif i in g:
                assert nz == set(range(n))  # global rows are dense over the real frames
            else:
                allowed = {j for j in range(max(0, i - w), min(n, i + w + 1))} | g
                assert nz <= allowed and g <= nz and len(nz) <= 2 * w + 1 + len(g)
            if i < n:
                torch.testing.assert_close(row.sum(-1), torch.ones(2))
        assert dense[b, :, :, n:].abs().max() == 0  # padding columns are never attended


def test_a_key_outside_the_window_and_not_global_does_not_reach_a_local_query():
    w = 3
    att, x, valid, glob = _pattern(w, lengths=(30, 30))
    i, j = 10, 20  # neither is global (segments of 8: globals 0,3,7,8,11,15,16,19,23,24,27,29)
    assert not glob[0, i] and not glob[0, j]
    base = att(x, valid, glob)
    x2 = x.clone()
    x2[0, j] += 5.0
    moved = att(x2, valid, glob)
    torch.testing.assert_close(moved[0, i], base[0, i])
    assert (moved[0, 19] - base[0, 19]).abs().max() > 0  # a global query sees it


def test_frame_scores_rule_and_pointer_loss():
    probs = torch.tensor([[0.1, 0.7, 0.1, 0.1], [0.05, 0.05, 0.2, 0.7]])
    picks = torch.tensor([1, 3])
    torch.testing.assert_close(frame_scores(probs, picks), torch.tensor([0.05, 0.7, 0.1, 0.7]))
    logits = torch.randn(1, 3, 5)
    full = pointer_loss(logits, torch.tensor([[0, 2, 4]]), 5)
    padded = pointer_loss(torch.cat([logits[:, :2], torch.randn(1, 1, 5)], 1), torch.tensor([[0, 2, -1]]), 5)
    assert full > 0 and padded > 0
    torch.testing.assert_close(padded, pointer_loss(logits[:, :2], torch.tensor([[0, 2]]), 5))


def test_global_tokens_are_first_middle_last_of_each_segment():
    assert torch.nonzero(segment_global_mask(20, 8)).flatten().tolist() == [0, 3, 7, 8, 11, 15, 16, 17, 19]
