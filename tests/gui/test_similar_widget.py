"""The Similar cases dock in a real napari viewer: k results with thumbnails, reports and findings for the
open image or a drawn rectangle; refusals as one sentence. Needs a display (Xvfb)."""

from __future__ import annotations

import os

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from tests.pretrain.synthetic import FINDINGS, write_archive

pytestmark = [
    pytest.mark.gui,
    pytest.mark.skipif(not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")),
                       reason="needs a display: run under Xvfb, e.g. xvfb-run -a pytest tests/gui"),
]


@pytest.fixture(scope="module")
def archive_index(tmp_path_factory):
    """A synthetic archive indexed with a small untrained encoder."""
    from medseg.engine.progress import run_sync
    from medseg.pretrain.data import read_pairs
    from medseg.pretrain.model import CMCGNS, ModelSpec
    from medseg.pretrain.pack import save_encoder_pack
    from medseg.pretrain.retrieval import build_index_iter
    from medseg.pretrain.text import Vocabulary

    root = tmp_path_factory.mktemp("similar")
    records = read_pairs(write_archive(root / "archive"))
    torch.manual_seed(0)
    vocab = Vocabulary.build(r.text for r in records)
    model = CMCGNS(ModelSpec(image_size=32, dim=32, heads=4, text_width=32, text_layers=1, text_heads=2, vocab_size=len(vocab), clusters=2)).eval()
    encoder = save_encoder_pack(model, vocab, root / "encoder", "tiny")
    index = run_sync(build_index_iter(encoder, records, root / "index"))
    return records, index


@pytest.fixture
def viewer_and_widget(make_napari_viewer):
    viewer = make_napari_viewer()
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-medseg", "Similar cases")
    return viewer, widget


def run_and_wait(qtbot, widget, timeout=30_000):
    widget.run_button.native.click()
    qtbot.waitUntil(lambda: not widget.running, timeout=timeout)


def test_shows_k_similar_cases_for_the_open_image(viewer_and_widget, archive_index, qtbot):
    records, index = archive_index
    viewer, widget = viewer_and_widget
    layer = viewer.add_image(iio.imread(records[4].image), name="chest")
    widget.reset_choices()
    widget.image.value = layer
    widget.index_path.value = index
    widget.k.value = 3
    run_and_wait(qtbot, widget)
    assert len(widget.cases) == 3 and len(widget.results) == 3, widget.last_message
    for rank, row in enumerate(widget.results, start=1):
        thumb, label = row[0], row[1]
        assert thumb.value.shape[:2] == (96, 96) and thumb.min_width == 96
        case = row.case
        assert label.value.startswith(f"{rank}. similarity") and case.finding in label.value and case.finding in FINDINGS
        assert case.text[:40] in label.value
    assert "3 similar cases from 12" in widget.last_message

    # a rectangle drawn on a Shapes layer searches that region only; a second run reuses the loaded index
    shapes = viewer.add_shapes([np.array([[5, 5], [5, 40], [40, 40], [40, 5]])], shape_type="rectangle", name="roi")
    widget.reset_choices()
    widget.region.value = shapes
    widget.k.value = 2
    loaded = widget._index
    run_and_wait(qtbot, widget)
    assert len(widget.results) == 2 and widget._index is loaded


def test_refuses_without_an_index_or_with_an_empty_shapes_layer(viewer_and_widget, archive_index, qtbot, tmp_path):
    _records, index = archive_index
    viewer, widget = viewer_and_widget
    widget.reset_choices()
    widget.run_button.native.click()
    assert "No image layer" in widget.last_message
    layer = viewer.add_image(np.random.default_rng(0).integers(0, 255, (40, 40), dtype=np.uint8), name="scan")
    widget.reset_choices()
    widget.image.value = layer
    widget.index_path.value = tmp_path
    widget.run_button.native.click()
    assert "not a similar-case index" in widget.last_message and not widget.running
    widget.index_path.value = index
    empty = viewer.add_shapes(name="nothing")
    widget.reset_choices()
    widget.region.value = empty
    widget.run_button.native.click()
    assert "has no shape" in widget.last_message and len(widget.results) == 0
