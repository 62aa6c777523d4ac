"""The Similar cases dock: the archived image-report pairs most like the open image (or a drawn region).

Thin by design: it gathers the image (the frame on screen for stacks), an optional rectangle from a
Shapes layer, the index folder (built with ``medseg similar --build``) and k; the core generator
:func:`medseg.pretrain.retrieval.similar_iter` runs off the GUI thread through :class:`JobRunner`;
the dock then lists the k cases with their thumbnails, scores, findings and reports.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generator

import numpy as np
from magicgui.widgets import ComboBox, Container, FileEdit, Label, ProgressBar, PushButton, RadioButtons, SpinBox
from magicgui.widgets import Image as ImageView
from napari.layers import Image, Shapes

from medseg.engine import CancelToken, Progress
from medseg.pretrain.retrieval import SimilarCase, SimilarIndex, load_index, similar_iter
from napari_medseg._widgets._job import JobDock, JobRunner

if TYPE_CHECKING:
    import napari

WHOLE_IMAGE = "whole image"
REPORT_CHARS = 400
THUMBNAIL_PX = 96


@dataclass
class SimilarRequest:
    """Everything one search needs, gathered on the GUI thread."""

    layer_name: str
    frame: np.ndarray
    rgb: bool
    index_path: Path
    k: int
    by: str
    region: tuple[int, int, int, int] | None
    index: SimilarIndex | None = None  # the index already loaded for this folder, if any


def similar_job(request: SimilarRequest, cancel: CancelToken | None = None) -> Generator[Progress, None, tuple[SimilarIndex, list[SimilarCase]]]:
    """Load the index (unless already loaded) and find the k most similar cases."""
    index = request.index if request.index is not None else load_index(request.index_path)
    cases = yield from similar_iter(index, request.frame, request.rgb, request.k, request.region, request.by, f"Layer '{request.layer_name}'", cancel)
    return index, cases


def region_of(shapes: Shapes, image: Image) -> tuple[int, int, int, int] | None:
    """The bounding box (y0, x0, y1, x1) in the image's pixels of the last shape drawn on ``shapes``."""
    if len(shapes.data) == 0:
        return None
    vertices = np.asarray(shapes.data[-1], dtype=float)[:, -2:]
    world = np.array([shapes.data_to_world(np.r_[np.zeros(shapes.ndim - 2), v]) for v in vertices])[:, -2:]
    pixels = np.array([image.world_to_data(np.r_[np.zeros(image.ndim - 2), w])[-2:] for w in world])
    (y0, x0), (y1, x1) = np.floor(pixels.min(0)), np.ceil(pixels.max(0))
    return int(y0), int(x0), int(y1), int(x1)


class SimilarWidget(JobDock, Container):
    """Find archived cases similar to an image layer (or to a rectangle drawn on it)."""

    def __init__(self, napari_viewer: "napari.viewer.Viewer") -> None:
        super().__init__(labels=True)
        viewer = self._viewer = napari_viewer
        self._index: SimilarIndex | None = None
        self.cases: list[SimilarCase] = []

        self.image = ComboBox(label="image", choices=self._image_choices, tooltip="the image to find similar cases for")
        self.region = ComboBox(label="region", choices=self._region_choices, tooltip="the whole image, or the last rectangle drawn on a Shapes layer")
        self.index_path = FileEdit(label="index", mode="d", tooltip="folder written by 'medseg similar --build --pairs FILE.csv --encoder DIR --index DIR'")
        self.k = SpinBox(label="cases", min=1, max=50, value=5, tooltip="how many similar cases to show")
        self.by = RadioButtons(label="compare with", choices=["image", "report"], value="image", orientation="horizontal",
                               tooltip="the archived images, or (across modalities) their reports")
        self.run_button = PushButton(text="Find similar cases")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        buttons = Container(widgets=[self.run_button, self.cancel_button], layout="horizontal", labels=False)
        self.progress = ProgressBar(label="progress", min=0, max=1, value=0)
        self.status = Label(label="", value="")
        self.status.native.setWordWrap(True)
        self.results = Container(labels=False)
        self.extend([self.image, self.region, self.index_path, self.k, self.by, buttons, self.progress, self.status, self.results])
        self.jobs = JobRunner(run_buttons=[self.run_button], cancel_button=self.cancel_button, bar=self.progress, status=self.status)

        self.run_button.changed.connect(self.run)
        self.cancel_button.changed.connect(self.jobs.cancel)
        for emitter in (viewer.layers.events.inserted, viewer.layers.events.removed, viewer.layers.events.moved):
            emitter.connect(self.reset_choices)
        self.native.destroyed.connect(lambda *_: self.jobs.cancel())

    # ------------------------------------------------------------------ choices
    def _image_choices(self, _widget=None) -> list[tuple[str, Image]]:
        return [(layer.name, layer) for layer in self._viewer.layers if isinstance(layer, Image) and not layer.multiscale]

    def _region_choices(self, _widget=None) -> list[tuple[str, Any]]:
        return [(WHOLE_IMAGE, None)] + [(f"last shape on '{layer.name}'", layer) for layer in self._viewer.layers if isinstance(layer, Shapes)]

    # ------------------------------------------------------------------ actions
    def run(self, _value=None):
        """Start a search; returns the worker (or ``None`` when the input is refused)."""
        if self.jobs.running:
            return None
        layer = self.image.value
        if layer is None:
            self.jobs.report("No image layer to search with: open an image (File > Open) and choose it under 'image'.", "error")
            return None
        folder = Path(str(self.index_path.value or ""))
        if not str(self.index_path.value or "").strip() or not (folder / "index.json").is_file():
            self.jobs.report(f"'{folder}' is not a similar-case index: choose the folder written by 'medseg similar --build'.", "error")
            return None
        frame = np.asarray(layer.data)
        if frame.ndim - (1 if layer.rgb else 0) == 3:  # a stack: the frame on screen
            index = int(np.clip(round(float(layer.world_to_data(self._viewer.dims.point)[0])), 0, frame.shape[0] - 1))
            frame = frame[index]
        region = None
        if self.region.value is not None:
            region = region_of(self.region.value, layer)
            if region is None:
                self.jobs.report(f"Shapes layer '{self.region.value.name}' has no shape: draw a rectangle on it, or search the whole image.", "error")
                return None
        index = self._index if self._index is not None and self._index.path == folder else None
        request = SimilarRequest(layer.name, frame, bool(layer.rgb), folder, int(self.k.value), str(self.by.value), region, index)
        return self.jobs.start(similar_job, request, description=f"Finding cases similar to {layer.name}", on_result=self._on_result)

    # ------------------------------------------------------------------ job outcome (GUI thread)
    def _on_result(self, outcome: tuple[SimilarIndex, list[SimilarCase]]) -> None:
        self._index, self.cases = outcome
        self.results.clear()
        for case in self.cases:
            self.results.append(self._case_row(case))
        self.jobs.report(f"{len(self.cases)} similar cases from {len(self._index)} in the index.")

    def _case_row(self, case: SimilarCase) -> Container:
        thumb = ImageView()
        thumb.set_data(np.repeat(case.thumbnail[..., None], 3, axis=-1), width=THUMBNAIL_PX)  # RGB: no colour map needed
        thumb.min_width = thumb.min_height = THUMBNAIL_PX  # the image widget's size policy would let the layout squeeze it away
        text = case.text if len(case.text) <= REPORT_CHARS else case.text[: REPORT_CHARS - 3] + "..."
        finding = f" — {case.finding}" if case.finding else ""
        label = Label(value=f"{case.rank}. similarity {case.score:.3f}{finding}\n{Path(case.image).name}\n{text}")
        label.native.setWordWrap(True)
        label.tooltip = case.text
        row = Container(widgets=[thumb, label], layout="horizontal", labels=False)
        row.case = case  # type: ignore[attr-defined]
        return row


__all__ = ["SimilarRequest", "SimilarWidget", "region_of", "similar_job"]
