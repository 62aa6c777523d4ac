"""The tiled Predictor: exact tiling, progress, cancel, bad inputs, frames."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from medseg.engine import CancelToken, PredictConfig, Predictor, run_sync
from medseg.engine.predictor import blend_weights, tile_starts
from medseg.errors import Cancelled, InputError, UsageError
from medseg.normalise import Normaliser
from medseg.train.packs import Pack, default_classes


class Identity(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()


def identity_pack(channels: int = 3) -> Pack:
    return Pack(
        id="identity",
        model=Identity(),
        architecture="identity",
        config="-",
        in_channels=channels,
        classes=default_classes(channels),
        normaliser=Normaliser("fixed", (0.0,) * channels, (1.0,) * channels, 1.0),
        activation="none",
    )


@pytest.mark.parametrize(
    "shape, tile, overlap",
    [((300, 260), 64, 0.25), ((100, 37), 32, 0.5), ((50, 50), 256, 0.0), ((129, 257), 64, 0.9), ((64, 64), 64, 0.5), ((97, 131), 48, 0.33)],
)
@pytest.mark.parametrize("blend", ["gaussian", "constant"])
def test_identity_model_through_tiler_returns_input(shape, tile, overlap, blend, rng):
    image = rng.random(shape + (3,)).astype(np.float32)
    cfg = PredictConfig(tile=tile, overlap=overlap, batch_size=3, device="cpu", blend=blend, probabilities=True, probability_dtype="float32")
    result = Predictor(identity_pack(), cfg).predict(image)
    np.testing.assert_allclose(result.probabilities, np.moveaxis(image, -1, 0), rtol=0, atol=1e-5)
    np.testing.assert_array_equal(result.labels, image.argmax(-1))


def test_tiles_cover_every_pixel_and_stay_inside():
    for length in range(1, 200, 7):
        for tile in (16, 32, 64):
            t = min(tile, length)
            starts = tile_starts(length, t, max(1, t // 2))
            covered = np.zeros(length, bool)
            for s in starts:
                assert 0 <= s and s + t <= length
                covered[s : s + t] = True
            assert covered.all()


def test_blend_weights_favour_the_centre():
    w = blend_weights(64, 64)
    assert w[32, 32] == pytest.approx(1.0, abs=1e-2)
    assert w[0, 0] < w[16, 16] < w[32, 32]
    assert w.min() > 0


def test_progress_counts_every_tile(unet_pack, rng):
    image = rng.integers(0, 255, (200, 150), dtype=np.uint8)
    job = Predictor(unet_pack, PredictConfig(tile=64, overlap=0.25, batch_size=4, device="cpu")).predict_iter(image)
    events = []
    result = run_sync(job, events.append)
    assert events[-1].done == events[-1].total == result.tiles
    assert [e.done for e in events] == sorted(e.done for e in events)
    assert result.labels.shape == image.shape and result.labels.dtype == np.uint8
    assert set(np.unique(result.labels)) <= {0, 1, 2}


def test_cancel_stops_within_one_batch(unet_pack, rng):
    image = rng.integers(0, 255, (256, 256), dtype=np.uint8)
    token = CancelToken()
    calls = []
    model = unet_pack.model
    hook = model.register_forward_hook(lambda *a: calls.append(1))
    job = Predictor(unet_pack, PredictConfig(tile=32, overlap=0.0, batch_size=2, device="cpu")).predict_iter(image, cancel=token)
    next(job)  # "starting"
    next(job)  # first batch done
    token.cancel()
    with pytest.raises(Cancelled):
        next(job)
    hook.remove()
    assert len(calls) == 1  # no forward after the cancel


def test_frame_stack_frame_by_frame_equals_single_frames(unet_pack, rng):
    stack = rng.integers(0, 255, (3, 70, 90), dtype=np.uint8)
    predictor = Predictor(unet_pack, PredictConfig(tile=64, overlap=0.25, batch_size=5, device="cpu"))
    whole = predictor.predict(stack)
    assert whole.labels.shape == stack.shape
    for t in range(3):
        np.testing.assert_array_equal(whole.labels[t], predictor.predict(stack[t]).labels)
    only = predictor.predict(stack, frames=[1])
    np.testing.assert_array_equal(only.labels[0], whole.labels[1])


def test_tiled_equals_untiled_for_pixelwise_model(rng):
    """A per-pixel model gives the same labels whatever the tiling."""
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Tanh(), nn.Conv2d(4, 3, 1)).eval()
    pack = identity_pack()
    pack.model, pack.activation = net, "softmax"
    image = rng.random((123, 77, 3)).astype(np.float32)
    a = Predictor(pack, PredictConfig(tile=32, overlap=0.5, device="cpu", probabilities=True, probability_dtype="float32")).predict(image)
    b = Predictor(pack, PredictConfig(tile=256, overlap=0.0, device="cpu", probabilities=True, probability_dtype="float32")).predict(image)
    np.testing.assert_allclose(a.probabilities, b.probabilities, atol=1e-5)


def test_grey_image_into_rgb_model_is_replicated(rng):
    image = rng.random((40, 30)).astype(np.float32)
    result = Predictor(identity_pack(3), PredictConfig(tile=32, device="cpu", probabilities=True, probability_dtype="float32")).predict(image)
    for c in range(3):
        np.testing.assert_allclose(result.probabilities[c], image, atol=1e-5)


@pytest.mark.parametrize(
    "array, message",
    [
        (np.zeros((2, 3, 40, 40, 1), np.uint8), "5-D"),
        (np.zeros((2, 3, 40, 40), np.uint8), "4-D"),
        (np.zeros((0, 10), np.uint8), "empty"),
        (np.full((40, 40), 7, np.uint8), "constant"),
        (np.full((40, 40), np.nan, np.float32), "NaN"),
        (np.zeros((40, 40, 5), np.uint8) + np.arange(5, dtype=np.uint8), "5-channel"),
    ],
)
def test_bad_arrays_are_refused_with_one_sentence(unet_pack, array, message):
    with pytest.raises(InputError, match=message) as info:
        Predictor(unet_pack, PredictConfig(tile=32, device="cpu")).predict(array)
    text = str(info.value)
    assert "\n" not in text and text.endswith(".")


def test_channel_count_the_model_cannot_take(rng):
    pack = identity_pack(3)
    pack.in_channels = 2
    with pytest.raises(InputError, match="model takes 2"):
        Predictor(pack, PredictConfig(tile=32, device="cpu")).predict(rng.random((40, 40)).astype(np.float32))


@pytest.mark.parametrize("kwargs", [{"tile": 4}, {"overlap": 1.0}, {"overlap": -0.1}, {"batch_size": 0}, {"blend": "median"}, {"device": "tpu"}])
def test_bad_settings_are_usage_errors(unet_pack, kwargs):
    with pytest.raises(UsageError):
        Predictor(unet_pack, PredictConfig(**{"device": "cpu", **kwargs}))


def test_class_values_are_mapped(rng):
    pack = identity_pack(3)
    pack.activation = "softmax"
    from medseg.train.packs import ClassInfo

    pack.classes = [ClassInfo(0, "bg", "#000000"), ClassInfo(200, "a", "#ff0000"), ClassInfo(600, "b", "#00ff00")]
    image = rng.random((20, 20, 3)).astype(np.float32)
    result = Predictor(pack, PredictConfig(tile=16, device="cpu")).predict(image)
    assert result.labels.dtype == np.uint16
    np.testing.assert_array_equal(result.labels, np.array([0, 200, 600])[image.argmax(-1)])


def test_image_is_resampled_to_the_pack_pixel_size_and_labels_come_back(rng):
    """A pack trained at 1.0 µm/px sees a 0.5 µm/px image at half size; labels return on the image's grid."""
    seen = []

    class Recorder(Identity):
        def forward(self, x):
            seen.append(tuple(x.shape[-2:]))
            return x.clone()

    pack = identity_pack(3)
    pack.model, pack.mpp = Recorder(), 1.0
    image = np.zeros((80, 120, 3), np.float32)
    image[20:60, 30:90, 1] = 1.0  # a block of class 1 on class 0
    image[..., 0] = 0.5
    result = Predictor(pack, PredictConfig(tile=256, device="cpu")).predict(image, mpp=0.5)
    assert seen == [(40, 60)]
    assert result.labels.shape == (80, 120) and result.info["resampled"]["factor"] == 0.5
    expected = np.where(image[..., 1] > image[..., 0], 1, 0)
    assert (result.labels == expected).mean() > 0.97
    same = Predictor(pack, PredictConfig(tile=256, device="cpu")).predict(image, mpp=1.0)
    assert seen[-1] == (80, 120) and "resampled" not in same.info
