"""Test-time augmentation: only the flips a pack was trained with, each flipped back, averaged."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medseg.engine import PredictConfig, Predictor
from medseg.engine.predictor import forward_scores, tta_flips
from medseg.train.augment import for_modality


def _with_augmentation(pack, modality: str):
    pack.manifest = {"training": {"augmentation": for_modality(modality).to_dict()}}
    return pack


@pytest.mark.parametrize("modality, expected", [
    ("ultrasound", ()),  # fixed orientation: never trained on a mirrored frame
    ("pathology", ((-1,), (-2,), (-2, -1))),
    ("endoscopy", ((-1,), (-2,), (-2, -1))),
])
def test_flips_follow_the_training_augmentation(unet_pack, modality, expected):
    assert tta_flips(_with_augmentation(unet_pack, modality)) == expected


def test_a_pack_without_training_record_gets_no_flips(unet_pack):
    unet_pack.manifest = {}
    assert tta_flips(unet_pack) == ()


def test_scores_are_the_mean_of_the_mirrored_passes_flipped_back(unet_pack):
    torch.manual_seed(1)
    x = torch.randn(2, 1, 32, 48)
    model = unet_pack.model.eval()
    device = torch.device("cpu")
    with torch.inference_mode():
        plain = forward_scores(model, x, device, "softmax")
        h = torch.softmax(model(x.flip(-1)), 1).flip(-1)
        v = torch.softmax(model(x.flip(-2)), 1).flip(-2)
        hv = torch.softmax(model(x.flip(-2, -1)), 1).flip(-2, -1)
        tta = forward_scores(model, x, device, "softmax", ((-1,), (-2,), (-2, -1)))
    assert not torch.allclose(plain, h, atol=1e-4)  # the model is not mirror-symmetric, so the test can tell
    torch.testing.assert_close(tta, (plain + h + v + hv) / 4, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tta.sum(1), torch.ones(2, 32, 48), rtol=1e-5, atol=1e-5)


def test_predictor_tta_changes_nothing_for_a_pack_trained_without_flips(unet_pack):
    image = np.random.default_rng(0).integers(0, 255, (80, 96)).astype(np.uint8)
    pack = _with_augmentation(unet_pack, "ultrasound")
    plain = Predictor(pack, PredictConfig(tile=64, probabilities=True)).predict(image)
    tta = Predictor(pack, PredictConfig(tile=64, probabilities=True, tta=True)).predict(image)
    np.testing.assert_array_equal(plain.labels, tta.labels)
    np.testing.assert_array_equal(plain.probabilities, tta.probabilities)


def test_predictor_tta_differs_for_a_pack_trained_with_flips(unet_pack):
    image = np.random.default_rng(0).integers(0, 255, (80, 96)).astype(np.uint8)
    pack = _with_augmentation(unet_pack, "pathology")
    plain = Predictor(pack, PredictConfig(tile=64, probabilities=True)).predict(image)
    tta = Predictor(pack, PredictConfig(tile=64, probabilities=True, tta=True)).predict(image)
    assert plain.probabilities.shape == tta.probabilities.shape
    assert not np.allclose(plain.probabilities, tta.probabilities, atol=1e-3)
