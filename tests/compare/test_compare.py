"""Model comparison core: agreement, pairwise Dice and scores against a reference on hand-computed cases,
and with real packs on real frames."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from medseg.compare import (
    CompareItem,
    CompareOptions,
    agreement_map,
    compare,
    compare_iter,
    compare_many_iter,
    load_contenders,
    pairwise_dice,
    plot_metric,
    save_figure,
    summary_markdown,
)
from medseg.engine import CancelToken, run_sync
from medseg.errors import Cancelled, InputError, ModelError, UsageError
from medseg.io import describe_array
from medseg.metrics import asd, hd95
from medseg.models import count_parameters
from medseg.train.packs import Pack, default_classes, load_pack
from tests.conftest import data_dir

OPTIONS = CompareOptions(device="cpu", warmup=False)


class Threshold(nn.Module):
    """Class 1 where the normalised intensity exceeds ``t``: a model whose output can be worked out by hand."""

    def __init__(self, t: float) -> None:
        super().__init__()
        self.t = nn.Parameter(torch.tensor(float(t)), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.zeros_like(x), 50.0 * (x - self.t)], dim=1)


def threshold_pack(name: str, t: float, classes: int = 2) -> Pack:
    pack = Pack(id=name, model=Threshold(t), architecture="threshold", config="test", in_channels=1, classes=default_classes(2))
    if classes != 2:
        pack.classes = default_classes(classes)
    return pack


def stripes(height: int = 2) -> np.ndarray:
    """Four vertical stripes 16 px wide (0, 85, 170, 255): z-scores -1.34, -0.45, 0.45, 1.34."""
    return np.repeat(np.repeat(np.array([[0, 85, 170, 255]], np.uint8), 16, axis=1), height, axis=0)


# --------------------------------------------------------------------------- hand-computed cases
def test_two_identical_models_agree_everywhere(unet_pack, rng):
    image = (rng.random((48, 64)) * 255).astype(np.uint8)
    result = compare(image, [unet_pack, unet_pack], options=OPTIONS)
    assert result.names == ["unet-untrained", "unet-untrained (2)"]
    np.testing.assert_array_equal(result.outputs[0].labels, result.outputs[1].labels)
    np.testing.assert_array_equal(result.agreement, np.full((48, 64), 2))
    assert result.full_agreement == 1.0
    assert not result.disagreement.any()
    for matrix in result.pairwise.values():
        np.testing.assert_array_equal(matrix, np.ones((2, 2)))
    assert all(r["pairwise Dice"] == 1.0 for r in result.rows())


def test_stripes_hand_computed_agreement_pairwise_and_scores():
    image = stripes()
    a, b = threshold_pack("a", 0.0), threshold_pack("b", 1.0)
    reference = np.zeros((2, 64), np.uint8)
    reference[:, 32:] = 1  # what model a predicts (the two bright stripes)
    result = compare(image, [a, b], reference, OPTIONS)
    np.testing.assert_array_equal(result.output("a").labels, reference)
    expected_b = np.zeros((2, 64), np.uint8)
    expected_b[:, 48:] = 1
    np.testing.assert_array_equal(result.output("b").labels, expected_b)
    # agreement: both say background on stripes 1-2, class 1 on stripe 4; they differ on stripe 3
    expected_agreement = np.full((2, 64), 2)
    expected_agreement[:, 32:48] = 1
    np.testing.assert_array_equal(result.agreement, expected_agreement)
    assert result.full_agreement == pytest.approx(0.75)
    np.testing.assert_array_equal(result.disagreement, 2 - expected_agreement)
    # pairwise Dice of class 1: 2 * 32 / (64 + 32) = 2/3
    assert result.pairwise["class 1"][0, 1] == pytest.approx(2 / 3)
    assert result.pairwise["mean"][1, 0] == pytest.approx(2 / 3)
    rows = {r["model"]: r for r in result.rows()}
    # the model equal to the reference scores perfectly
    assert rows["a"]["Dice class 1"] == 1.0 and rows["a"]["IoU class 1"] == 1.0
    assert rows["a"]["HD95 class 1"] == 0.0 and rows["a"]["ASD class 1"] == 0.0
    # b: Dice 2/3, IoU 1/2; every pixel of a 2-row image is a boundary pixel, so the distances are by column:
    # b -> ref all 0; ref -> b 16, 15, ..., 1 (twice each) and 32 zeros
    assert rows["b"]["Dice class 1"] == pytest.approx(2 / 3)
    assert rows["b"]["IoU class 1"] == pytest.approx(0.5)
    assert rows["b"]["ASD class 1"] == pytest.approx(2 * sum(range(1, 17)) / (32 + 64))
    assert rows["b"]["HD95 class 1"] == pytest.approx(14.85)  # 95th percentile of 64 sorted values: 14 + 0.85 * (15 - 14)
    assert rows["b"]["HD95 class 1"] == pytest.approx(hd95(expected_b, reference))
    assert rows["b"]["ASD class 1"] == pytest.approx(asd(expected_b, reference))
    assert rows["a"]["mean Dice"] == 1.0 and rows["b"]["mean Dice"] == pytest.approx(2 / 3)
    assert rows["a"]["params (M)"] == pytest.approx(1e-6)
    assert rows["a"]["seconds"] > 0


def test_agreement_map_counts_the_majority():
    m1 = np.array([[0, 1, 2]])
    m2 = np.array([[0, 1, 1]])
    m3 = np.array([[0, 2, 0]])
    np.testing.assert_array_equal(agreement_map([m1, m2, m3]), [[3, 2, 1]])


def test_pairwise_dice_is_symmetric_with_unit_diagonal():
    m1 = np.array([[1, 1, 0, 0]])
    m2 = np.array([[1, 0, 0, 0]])
    m3 = np.array([[0, 0, 1, 1]])
    d = pairwise_dice([m1, m2, m3], {1: "x"})["x"]
    np.testing.assert_allclose(d, d.T)
    np.testing.assert_allclose(np.diag(d), 1.0)
    assert d[0, 1] == pytest.approx(2 * 1 / 3)
    assert d[0, 2] == 0.0


def test_frame_stack_is_scored_frame_by_frame():
    stack = np.stack([stripes(4), stripes(4)[:, ::-1]])
    a, b = threshold_pack("a", 0.0), threshold_pack("b", 1.0)
    reference = run_sync(compare_iter(stack, [a], options=OPTIONS)).outputs[0].labels
    result = compare(stack, [a, b], reference, OPTIONS)
    assert result.agreement.shape == (2, 4, 64)
    cases = result.cases["b"]
    assert [c["frame"] for c in cases] == [0, 1]
    assert all(c["metrics"]["class 1"]["dice"] == pytest.approx(2 / 3) for c in cases)
    # only the second frame, with the whole stack as reference
    one = compare(stack, [a, b], reference, OPTIONS, frames=[1])
    assert one.outputs[0].labels.shape == (1, 4, 64)
    assert [c["frame"] for c in one.cases["a"]] == [1]
    assert one.cases["a"][0]["metrics"]["class 1"]["dice"] == 1.0


def test_object_f1_for_object_packs():
    image = stripes(8)
    a, b = threshold_pack("a", 0.0), threshold_pack("b", 1.0)
    a.manifest = {"postprocess": {"min_object_area_um2": 0.0}}
    reference = np.zeros((8, 64), np.uint8)
    reference[:, 32:] = 1
    rows = {r["model"]: r for r in compare(image, [a, b], reference, OPTIONS).rows()}
    assert rows["a"]["object F1"] == 1.0
    assert rows["b"]["object F1"] == 1.0  # IoU 0.5 reaches the KPIs threshold
    rows = {r["model"]: r for r in compare(image, [a, b], reference, CompareOptions(device="cpu", objects=False)).rows()}
    assert "object F1" not in rows["a"]


def test_probabilities_on_request():
    result = compare(stripes(), [threshold_pack("a", 0.0)], options=CompareOptions(device="cpu", probabilities=True))
    probs = result.outputs[0].probabilities
    assert probs.shape == (2, 2, 64)
    np.testing.assert_allclose(probs.sum(axis=0), 1.0, atol=1e-2)
    assert compare(stripes(), [threshold_pack("a", 0.0)], options=OPTIONS).outputs[0].probabilities is None


# --------------------------------------------------------------------------- refusals
def test_models_with_different_classes_are_refused():
    with pytest.raises(ModelError, match="same task"):
        load_contenders([threshold_pack("a", 0.0), threshold_pack("c", 0.0, classes=3)])


def test_reference_of_another_shape_is_refused():
    with pytest.raises(InputError, match="reference mask has shape"):
        compare(stripes(), [threshold_pack("a", 0.0)], np.zeros((3, 3), np.uint8), OPTIONS)


def test_unknown_pack_is_one_sentence():
    with pytest.raises(UsageError, match="No pack named"):
        load_contenders(["no-such-pack"])


def test_cancel_stops_between_batches(unet_pack, rng):
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        run_sync(compare_iter((rng.random((64, 64)) * 255).astype(np.uint8), [unet_pack, unet_pack], options=OPTIONS, cancel=token))


def test_progress_counts_up_to_the_total(unet_pack, rng):
    events = []
    run_sync(compare_iter((rng.random((64, 64)) * 255).astype(np.uint8), [unet_pack, unet_pack], options=OPTIONS), events.append)
    counted = [e for e in events if e.total]
    assert counted[-1].done == counted[-1].total == 200
    assert all(a.done <= b.done for a, b in zip(counted, counted[1:]))
    assert any("unet-untrained (2)" in e.message for e in events)


def test_figure_and_report(tmp_path):
    result = compare(stripes(), [threshold_pack("a", 0.0), threshold_pack("b", 1.0)], stripes() > 128, OPTIONS)
    fig = plot_metric(result.rows(), "Dice class 1")
    heights = [bar.get_height() for bar in fig.axes[0].patches]
    assert heights == pytest.approx([1.0, 2 / 3])
    out = save_figure(fig, tmp_path / "f.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(UsageError, match="no column"):
        plot_metric(result.rows(), "nonsense")


def test_many_images_summary(unet_pack, rng):
    images = [describe_array((rng.random((32, 48)) * 255).astype(np.uint8)) for _ in range(3)]
    seen = []
    summary = run_sync(compare_many_iter((CompareItem(i) for i in images), [unet_pack, unet_pack], OPTIONS, count=3,
                                         on_result=lambda item, r: seen.append(r.full_agreement)))
    assert seen == [1.0, 1.0, 1.0]
    assert summary.n_images == 3 and summary.full_agreement == 1.0
    assert [r["n"] for r in summary.rows] == [3, 3]
    np.testing.assert_array_equal(summary.pairwise, np.ones((2, 2)))
    assert "Pixels on which all models agree: 100.0 %" in summary_markdown(summary)


# --------------------------------------------------------------------------- real packs, real frames
def test_shipped_pack_against_its_own_output_and_the_reference():
    from medseg.io import read_image, read_labels

    folder = data_dir("psfhs")
    image = read_image(folder / "images" / "04400.png")
    reference = read_labels(folder / "labels" / "04400.png")
    first = compare(image, ["ultrasound-fhps"], reference, OPTIONS)
    own = first.outputs[0].labels
    result = compare(image, ["ultrasound-fhps", "same=ultrasound-fhps"], own, OPTIONS)
    rows = {r["model"]: r for r in result.rows()}
    assert rows["ultrasound-fhps"]["mean Dice"] == 1.0 and rows["same"]["mean Dice"] == 1.0
    assert rows["ultrasound-fhps"]["abs. ΔAoP °"] == 0.0
    assert result.full_agreement == 1.0
    real = {r["model"]: r for r in first.rows()}["ultrasound-fhps"]
    assert real["Dice fetal head"] > 0.8 and real["Dice pubic symphysis"] > 0.6
    assert real["abs. ΔAoP °"] is not None and not math.isnan(real["abs. ΔAoP °"])
    assert real["params (M)"] == pytest.approx(count_parameters(load_pack("ultrasound-fhps").model) / 1e6, abs=0.01)
