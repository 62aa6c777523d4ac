"""The click session: one click selects the object under it and no other, a negative click removes the
region it lands in, boxes, undo, refusals; the fallback on a shipped pack and real ultrasound; the
click-guided variant saves and loads as an interactive pack."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medseg.errors import InputError
from medseg.interactive.clicks import DISKS as ENCODING, Box, Click
from medseg.interactive.evaluate import click_run, objects_of, summarise_runs
from medseg.interactive.session import ClickSession, segment_clicks
from medseg.metrics import iou
from tests.conftest import data_dir
from tests.interactive._fixtures import DISKS, bright_pack, disk_image


def test_a_click_inside_an_object_selects_that_object_and_no_other():
    image, ids = disk_image()
    session = ClickSession(image, bright_pack())
    for k, (r, c, _) in enumerate(DISKS, start=1):
        session.reset()
        step = session.add(Click(c + 3, r - 2))
        assert step.mask.dtype == bool and step.mask.shape == image.shape
        assert iou(step.mask, ids == k) > 0.95
        assert not (step.mask & (ids > 0) & (ids != k)).any()


def test_a_negative_click_removes_the_region_it_lands_in():
    image, ids = disk_image()
    session = ClickSession(image, bright_pack())
    session.set_box(Box.from_corners(80, 20, 120, 62))  # disk 2, from a box: no positive click inside it
    session.add(Click(40, 40))
    assert iou(session.mask, (ids == 1) | (ids == 2)) > 0.95
    step = session.add(Click(108, 36, positive=False))
    assert iou(step.mask, ids == 1) > 0.95 and not (step.mask & (ids == 2)).any()
    outside = session.add(Click(5, 130, positive=False))
    assert np.array_equal(outside.mask, step.mask) and "nothing to remove" in outside.note
    assert session.undo() and session.undo() and iou(session.mask, (ids == 1) | (ids == 2)) > 0.95


def test_clicks_outside_the_image_or_on_an_empty_image_are_refused():
    image, _ = disk_image()
    session = ClickSession(image, bright_pack())
    with pytest.raises(InputError, match="outside the image"):
        session.add(Click(150, 10))
    assert session.steps == []
    with pytest.raises(InputError, match="empty"):
        ClickSession(np.zeros((64, 64), np.uint8), bright_pack())
    with pytest.raises(InputError, match="outside the image"):
        segment_clicks(image, bright_pack(), [Click(10, 10), Click(10, -4, False)])


def test_a_click_on_background_adds_nothing_and_says_so():
    image, _ = disk_image()
    step = ClickSession(image, bright_pack()).add(Click(5, 130))
    assert not step.mask.any() and "no object" in step.note


def test_a_box_runs_the_pack_on_that_rectangle_only():
    image, ids = disk_image()
    session = ClickSession(image, bright_pack())
    step = session.set_box(Box.from_corners(80, 20, 120, 62))  # around disk 2 only
    assert iou(step.mask, ids == 2) > 0.95
    session.add(Click(40, 40))  # a click after the box adds another object
    assert iou(session.mask, (ids == 1) | (ids == 2)) > 0.95
    with pytest.raises(InputError, match="box"):
        session.set_box(Box(200, 200, 300, 300))


def test_the_window_prediction_is_cached_between_clicks():
    image, _ = disk_image()
    session = ClickSession(image, bright_pack())
    assert session.add(Click(40, 40)).ran_network
    assert not session.add(Click(42, 41)).ran_network


def test_prepare_predicts_the_one_window_ahead_so_the_first_click_runs_no_network():
    image, ids = disk_image()  # smaller than a window: every click uses the whole image
    session = ClickSession(image, bright_pack())
    assert session.prepare() and not session.prepare()  # ran once, then cached
    first = session.add(Click(40, 40))
    assert not first.ran_network and first.mask[40, 40]
    assert first.mask.tolist() == ClickSession(image, bright_pack()).add(Click(40, 40)).mask.tolist()  # the same object as unprepared
    big = disk_image(shape=(1200, 1200))[0]  # larger than a window: which window depends on the click, nothing to do ahead
    assert not ClickSession(big, bright_pack()).prepare()


def test_prepare_runs_the_seed_of_a_seeded_interactive_pack_ahead():
    from medseg.interactive.session import GuidedEngine
    from medseg.io.images import describe_array
    from tests.interactive._fixtures import echo_pack

    image, ids = disk_image()
    engine = GuidedEngine(echo_pack(), describe_array(image), None, seed=bright_pack())
    assert engine.prepare() and len(engine.seed._cache) == 1
    step = engine.step(np.zeros(image.shape, bool), [Click(100, 40)])
    assert len(engine.seed._cache) == 1 and iou(step.mask, ids == 2) > 0.95  # the first click used the prepared window
    assert not GuidedEngine(echo_pack(), describe_array(image), None).prepare()  # not seeded: nothing ahead


def test_the_protocol_reaches_the_objects_with_the_fallback():
    image, ids = disk_image()
    session = ClickSession(image, bright_pack())
    objects = objects_of(ids, {1: "a", 2: "b", 3: "c"})
    runs = [click_run(session, obj, name, max_clicks=5) for name, obj in objects]
    summary = summarise_runs(runs, max_clicks=5)
    assert summary["objects"] == 3 and summary["noc90"] == 1.0 and summary["iou1"] > 0.95


def test_fallback_with_the_shipped_ultrasound_pack_on_a_real_frame():
    from medseg.io import read_image
    from medseg.train.packs import load_pack

    root = data_dir("psfhs")
    image = read_image(root / "images" / "04400.png")
    from medseg.train.datasets import Case, read_mask

    truth = read_mask(Case("04400", root / "images" / "04400.png", root / "labels" / "04400.png"), 3)
    rows, cols = np.nonzero(truth == 2)
    mask = segment_clicks(image, load_pack("ultrasound-fhps"), [Click(cols.mean(), rows.mean())])
    assert mask.dtype == np.uint8 and mask.shape == truth.shape and set(np.unique(mask)) <= {0, 1}
    assert iou(mask.astype(bool), truth == 2) > 0.8 and not (mask.astype(bool) & (truth == 1)).any()


def _interactive_pack(tmp_path):
    from medseg import models
    from medseg.models.guided import GuidedNet
    from medseg.train.packs import Pack, default_classes, load_pack, save_pack

    torch.manual_seed(0)
    net = GuidedNet(models.build("unet", in_channels=1, num_classes=2), 3).eval()
    pack = Pack("toy-click", net, "unet", "small", 1, default_classes(2, ["background", "object"]), tile=64, interactive=True, manifest={"click_encoding": ENCODING})
    save_pack(pack, tmp_path / "toy-click")
    return load_pack(tmp_path / "toy-click")


def test_an_interactive_pack_round_trips_and_keeps_only_clicked_objects(tmp_path):
    from medseg.models.guided import GuidedNet

    pack = _interactive_pack(tmp_path)
    assert pack.interactive and isinstance(pack.model, GuidedNet) and pack.manifest["click_encoding"]["kind"] == "disks"
    image, ids = disk_image()
    session = ClickSession(image, pack)
    assert session.interactive
    from scipy import ndimage

    for click in (Click(40, 40), Click(100, 40, positive=False), Click(70, 100)):
        step = session.add(click)
        assert step.ran_network
        labels, n = ndimage.label(step.mask, structure=np.ones((3, 3)))
        positives = [c for c in session.clicks if c.positive]
        # the untrained network may see nothing; whatever it keeps holds a positive click, and no negative one
        assert all(labels[c.row, c.col] == 0 for c in session.clicks if not c.positive)
        assert {int(v) for v in np.unique(labels)} - {0} <= {int(labels[c.row, c.col]) for c in positives}
        assert step.mask.any() or "no object" in step.note


def test_the_widened_stem_starts_from_the_automatic_weights():
    from medseg import models
    from medseg.models.guided import GuidedNet, load_widened

    torch.manual_seed(0)
    auto = models.build("unet", in_channels=1, num_classes=3).eval()
    guided = GuidedNet(models.build("unet", in_channels=1, num_classes=2), 3).eval()
    loaded, skipped = load_widened(guided, auto.state_dict())
    assert not skipped and loaded
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        a = auto(x)
        g = guided(torch.cat([x, torch.zeros(1, 3, 64, 64)], dim=1))
    assert torch.allclose(g[:, 0], a[:, 0], atol=1e-4)  # background scores unchanged with empty guidance
    assert torch.allclose(g[:, 1], a[:, 1:].mean(1), atol=1e-4)


def test_a_negative_click_on_an_object_holding_positive_clicks_removes_only_its_side():
    from tests.interactive._fixtures import disk_image as make

    image, ids = make(shape=(80, 140), disks=[(40, 40, 20), (40, 74, 20)])  # two disks that overlap into one blob
    session = ClickSession(image, bright_pack())
    session.add(Click(35, 40))
    assert iou(session.mask, ids > 0) > 0.95
    step = session.add(Click(78, 40, positive=False))  # deep in the right disk: its whole side goes
    assert step.mask[40, 35] and not step.mask[40, 78]
    left = np.zeros_like(ids, bool)
    left[:, :57] = True
    assert iou(step.mask, (ids > 0) & left) > 0.85
    session.undo()
    step = session.add(Click(92, 40, positive=False))  # near the right edge: only a band along that edge goes
    assert step.mask[40, 35] and step.mask[40, 74] and not step.mask[40, 92]
    assert 0 < (ids > 0).sum() - step.mask.sum() < 0.25 * ((ids > 0) & ~left).sum()
    again = session.add(Click(93, 44))  # a positive click in what was removed brings that part back
    assert again.mask[40, 92]


def test_bf16_clicks_give_the_same_object_as_float32():
    from medseg.io import read_image
    from medseg.train.packs import load_pack

    image = read_image(data_dir("psfhs") / "images" / "04400.png")
    pack = load_pack("ultrasound-fhps")
    clicks = [Click(128, 150)]
    exact = segment_clicks(image, pack, clicks).astype(bool)
    fast = segment_clicks(image, pack, clicks, bf16=True).astype(bool)
    assert exact.sum() > 1000 and iou(exact, fast) > 0.97


def test_the_shipped_interactive_pack_is_listed_apart_and_refused_by_the_automatic_predictor(tmp_path):
    from medseg.engine import Predictor
    from medseg.errors import ModelError
    from medseg.train.packs import available_packs, load_pack

    assert "colon-polyp-click" not in available_packs() and "colon-polyp-click" in available_packs("interactive")
    pack = load_pack("colon-polyp-click")
    assert pack.interactive and pack.manifest["kind"] == "interactive" and pack.manifest["click_encoding"] == ENCODING
    assert pack.manifest["automatic_pack"] == "colon-polyp" and pack.manifest["metrics"]["polyp"]["objects"] > 0
    assert pack.manifest["training"]["init_from"]["pack"] in ("colon-polyp", "colon-polyp-click")  # a chain of runs from the automatic pack
    with pytest.raises(ModelError, match="is interactive: it segments from clicks"):
        Predictor(pack)
    image, ids = disk_image()
    rgb = np.repeat(image[..., None], 3, axis=-1)
    step = ClickSession(rgb, pack, bf16=True).add(Click(40, 40))
    assert step.ran_network and step.mask.shape == image.shape


def test_the_first_click_of_an_interactive_pack_starts_from_its_automatic_pack(tmp_path, monkeypatch):
    """Seeded, the network gets the automatic pack's object under the first click as its previous mask
    (a network that answers its previous mask then returns that object); unseeded it returns nothing."""
    from medseg.interactive.session import GuidedEngine, seed_pack_of
    from medseg.io.images import describe_array
    from tests.interactive._fixtures import echo_pack

    image, ids = disk_image()
    data = describe_array(image)
    click = Click(100, 40)  # inside disk 2
    seeded = GuidedEngine(echo_pack(), data, None, seed=bright_pack()).step(np.zeros(image.shape, bool), [click])
    assert iou(seeded.mask, ids == 2) > 0.95 and not (seeded.mask & (ids != 2)).any()
    assert "started from bright's object" in seeded.note
    alone = GuidedEngine(echo_pack(), data, None).step(np.zeros(image.shape, bool), [click])
    assert not alone.mask.any() and "sees no object" in alone.note  # the network alone sees only the click: nothing
    # later clicks are the network's: a negative click is not re-seeded
    later = GuidedEngine(echo_pack(), data, None, seed=bright_pack()).step(seeded.mask, [click, Click(40, 40, positive=False)])
    assert iou(later.mask, ids == 2) > 0.95
    # the session seeds when the manifest asks for it and the automatic pack it names is installed
    asks = {"seed_first_click": True}
    assert seed_pack_of(echo_pack()) is None and seed_pack_of(echo_pack({"automatic_pack": "no-such-pack", **asks})) is None
    assert seed_pack_of(echo_pack({"automatic_pack": "ultrasound-fhps"})) is None  # not asked
    monkeypatch.setenv("MEDSEG_MODELS", str(tmp_path))
    _interactive_pack(tmp_path)  # an interactive pack is never a seed
    assert seed_pack_of(echo_pack({"automatic_pack": "toy-click", **asks})) is None
    assert seed_pack_of(echo_pack({"automatic_pack": "ultrasound-fhps", **asks})).id == "ultrasound-fhps"
    assert ClickSession(image, echo_pack({"automatic_pack": "ultrasound-fhps", **asks})).engine.seed is not None
    assert ClickSession(image, echo_pack({"automatic_pack": "ultrasound-fhps", **asks}), seed=False).engine.seed is None


def test_the_class_argmax_matches_numpy_including_ties():
    from medseg.interactive.session import _class_argmax

    rng = np.random.default_rng(0)
    probs = rng.random((4, 30, 20)).astype(np.float32)
    probs[2, :5] = probs[1, :5] = probs[3, :5] = 2.0  # ties: the first class wins, as in numpy
    np.testing.assert_array_equal(_class_argmax(probs), probs.argmax(axis=0))
