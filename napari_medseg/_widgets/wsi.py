"""The Whole slide dock widget: open a slide, run a pack over the whole slide, its tissue, the field of
view or a drawn rectangle, watch labels appear as chunks finish, browse and export the objects.

Thin by design: it gathers choices, runs the core generator :func:`medseg.engine.wsi.segment_slide_iter`
and then :func:`medseg.measure.objects.slide_objects` in napari's ``thread_worker``, shows the zarr
label pyramid as a multiscale Labels layer (refreshed as chunks are written), and fills the object
table. Clicking a row centres the view on that object. Exports call :func:`medseg.measure.objects.write_csv`
and :func:`medseg.io.geojson.write_geojson`.
"""

from __future__ import annotations

import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generator

import numpy as np
from magicgui.widgets import ComboBox, Container, FileEdit, FloatSpinBox, Label, ProgressBar, PushButton, RadioButtons, SpinBox, Table
from napari.layers import Image, Labels, Shapes

from medseg.engine.progress import CancelToken, Progress
from medseg.engine.wsi import SlideConfig, SlideResult, segment_slide_iter
from medseg.errors import MedsegError
from medseg.measure.objects import SlideObject, slide_objects, write_csv
from medseg.train.packs import available_packs, resolve
from napari_medseg._slide_io import result_layer_data, slide_layer_data
from napari_medseg._widgets._common import chosen_manifest, device_choices
from napari_medseg._widgets._job import JobDock, JobRunner, Refused, refusing

if TYPE_CHECKING:
    import napari

WHOLE, TISSUE, FOV, RECTANGLE = "whole slide", "tissue", "field of view", "rectangle"
TABLE_COLUMNS = ["id", "class", "x", "y", "area µm²", "perimeter µm", "confidence"]
REFRESH_S = 0.5
MAX_TABLE_ROWS = 5000  # a Qt table with many more rows takes seconds to fill; exports hold every object


# --------------------------------------------------------------------------- the job (worker thread)
@dataclass
class WsiRequest:
    """Everything one run needs, gathered on the GUI thread."""

    slide_path: str
    slide_mpp: float | None
    pack_id: str
    config: SlideConfig
    output: Path
    min_area_um2: float = 0.0
    cancel: CancelToken = field(default_factory=CancelToken)


@dataclass
class WsiOutcome:
    result: SlideResult
    objects: list[SlideObject]


@refusing
def wsi_job(request: WsiRequest, cancel: CancelToken | None = None) -> Generator[Progress, None, WsiOutcome]:
    yield Progress(0, 0, f"loading {request.pack_id}")
    pack = resolve(request.pack_id)
    result = yield from segment_slide_iter(request.slide_path, pack, request.output, request.config, cancel or request.cancel)
    yield Progress(0, 0, "measuring objects")
    objects = slide_objects(result, min_area_um2=request.min_area_um2 or None)
    return WsiOutcome(result, objects)


# --------------------------------------------------------------------------- the widget (GUI thread)
class WsiWidget(JobDock, Container):
    """Whole-slide inference, objects and export."""

    def __init__(self, napari_viewer: "napari.viewer.Viewer") -> None:
        super().__init__(labels=True)
        viewer = self._viewer = napari_viewer
        self._request: WsiRequest | None = None
        self._slide_layer: Image | None = None
        self._last_refresh = 0.0
        self.result: SlideResult | None = None
        self.objects: list[SlideObject] = []
        self.result_layer: Labels | None = None
        self.partial_updates = 0

        self.file = FileEdit(label="slide file", mode="r", filter="Slides (*.svs *.ndpi *.mrxs *.scn *.bif *.tif *.tiff *.vms *.vmu *.svslide)")
        self.open_button = PushButton(text="Open slide")
        self.slide = ComboBox(label="slide", choices=self._slide_choices, tooltip="a slide layer (opened here or with File > Open)")
        self.model = ComboBox(label="model", choices=lambda _w=None: sorted(available_packs()))
        self.model_info = Label(label="", value="")
        self.level = ComboBox(label="level", choices=self._level_choices, tooltip="pyramid level read (resampled to the pack's µm/px where they differ by more than 2 %)")
        self.scope = RadioButtons(label="run on", choices=[WHOLE, TISSUE, FOV, RECTANGLE], value=TISSUE, orientation="vertical",
                                  tooltip="rectangle: the last rectangle of the selected (or topmost) Shapes layer")
        self.assembly = ComboBox(label="assembly", choices=["blend", "vote"], value="blend",
                                 tooltip="blend: overlap-weighted probabilities; vote: KPIs baseline, foreground where >= 2 windows agree")
        self.min_area = FloatSpinBox(label="min area µm²", min=0.0, max=1e8, step=100.0, value=0.0, tooltip="objects smaller than this are dropped")
        self.device = ComboBox(label="device", choices=device_choices(), value="auto")
        self.batch_size = SpinBox(label="batch size", min=1, max=1024, value=8)
        self.output = FileEdit(label="output", mode="w", filter="*.zarr", tooltip="zarr folder for the labels (empty: a temporary folder); reuse it to resume")
        self.run_button = PushButton(text="Run")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(label="progress", min=0, max=1, value=0)
        self.status = Label(label="", value="")
        self.table = Table(value={c: [] for c in TABLE_COLUMNS})
        self.object_type = ComboBox(label="GeoJSON as", choices=["detection", "annotation"], value="detection", tooltip="QuPath object type of exported objects")
        self.export_csv_button = PushButton(text="Export CSV…", enabled=False)
        self.export_geojson_button = PushButton(text="Export GeoJSON…", enabled=False)
        for label in (self.model_info, self.status):
            label.native.setWordWrap(True)
        self.extend([
            Container(widgets=[self.file, self.open_button], layout="horizontal", labels=False),
            self.slide, self.model, self.model_info, self.level, self.scope, self.assembly, self.min_area, self.device, self.batch_size, self.output,
            Container(widgets=[self.run_button, self.cancel_button], layout="horizontal", labels=False),
            self.progress, self.status, self.table, self.object_type,
            Container(widgets=[self.export_csv_button, self.export_geojson_button], layout="horizontal", labels=False),
        ])
        self.jobs = JobRunner(run_buttons=[self.run_button], cancel_button=self.cancel_button, bar=self.progress, status=self.status)
        self.table.read_only = True
        self.table.native.cellClicked.connect(self._on_row_clicked)
        self.open_button.changed.connect(self._on_open)
        self.slide.changed.connect(lambda *_: self.level.reset_choices())
        self.model.changed.connect(self._on_model_changed)
        self.run_button.changed.connect(self.run)
        self.cancel_button.changed.connect(self.cancel)
        self.export_csv_button.changed.connect(lambda *_: self._export_dialog("csv"))
        self.export_geojson_button.changed.connect(lambda *_: self._export_dialog("geojson"))
        for emitter in (viewer.layers.events.inserted, viewer.layers.events.removed):
            emitter.connect(self.reset_choices)
        self.native.destroyed.connect(lambda *_: self.jobs.cancel())
        self._on_model_changed()

    # ------------------------------------------------------------------ choices
    def _slide_choices(self, _widget=None) -> list[tuple[str, Image]]:
        return [(layer.name, layer) for layer in self._viewer.layers if isinstance(layer, Image) and "slide_path" in layer.metadata.get("medseg", {})]

    def _level_choices(self, _widget=None) -> list[tuple[str, Any]]:
        choices: list[tuple[str, Any]] = [("auto (closest to the pack's µm/px)", None)]
        layer = self.slide.value if hasattr(self, "slide") else None
        if layer is not None:
            for i, lv in enumerate(layer.metadata["medseg"]["levels"]):
                mpp = f"{lv['mpp']:.3g} µm/px, " if lv.get("mpp") else ""
                choices.append((f"{i}: {mpp}{lv['shape'][1]} x {lv['shape'][0]}", i))
        return choices

    def _on_model_changed(self, _value=None) -> None:
        manifest, reason = chosen_manifest(self.model.value, "no pack installed: add a folder of packs to MEDSEG_MODELS")
        if manifest is None:
            self.model_info.value = reason
            return
        mpp = manifest.get("mpp")
        area = ((manifest.get("postprocess") or {}).get("min_object_area_um2")) or 0.0
        self.min_area.value = float(area)
        names = ", ".join(str(c.get("name")) for c in manifest.get("classes", []))
        self.model_info.value = f"classes: {names}" + (f"; runs at {mpp:g} µm/px" if mpp else "; no pixel size: runs on level 0")

    # ------------------------------------------------------------------ actions
    def open_slide(self, path: str | Path) -> Image | None:
        """Open a slide as a lazy multiscale layer and choose it."""
        try:
            data, kwargs, _ = slide_layer_data(path)
        except MedsegError as exc:
            self._report(str(exc), "error")
            return None
        layer = self._viewer.add_image(data, **kwargs)
        self.reset_choices()
        self.slide.value = layer
        mpp = layer.metadata["medseg"]["mpp"]
        self._report(f"{layer.name}: {len(layer.metadata['medseg']['levels'])} level(s), " + (f"{mpp:.3f} µm/px" if mpp else "pixel size unknown (coordinates in pixels)"), "status")
        return layer

    def _on_open(self, _value=None) -> None:
        path = str(self.file.value)
        if not path or path == ".":
            self._report("Choose a slide file first.", "error")
            return
        self.open_slide(path)

    def run(self, _value=None):
        """Start a run; returns the worker (or ``None`` when the choices are refused)."""
        if self.jobs.running:
            return None
        layer = self.slide.value
        if layer is None:
            self._report("No slide to segment: open one with 'Open slide' (or File > Open) first.", "error")
            return None
        if self.model.value is None:
            self._report("No model pack is installed: add a folder of packs to MEDSEG_MODELS, then reopen this widget.", "error")
            return None
        meta = layer.metadata["medseg"]
        region = None
        if self.scope.value == FOV:
            region = self._fov_region(layer)
        elif self.scope.value == RECTANGLE:
            region = self._rectangle_region(layer)
            if region is None:
                self._report("No rectangle to run on: draw one in a Shapes layer (rectangle tool), then run again.", "error")
                return None
        config = SlideConfig(batch_size=self.batch_size.value, device=self.device.value, assembly=self.assembly.value, level=self.level.value,
                             tissue=self.scope.value != WHOLE, region=region)
        output = self._output_path(layer, region)
        self._request = WsiRequest(meta["slide_path"], meta.get("mpp"), self.model.value, config, output, self.min_area.value)
        self._slide_layer = layer
        self.result_layer = None
        self.partial_updates = 0
        return self.jobs.start(wsi_job, self._request, description=f"running {self.model.value} on the {self.scope.value} of {layer.name}",
                               on_result=self._on_result, on_done=self._on_done, on_progress=self._on_progress)

    def cancel(self, _value=None) -> None:
        if self.jobs.running:
            self.jobs.cancel()
            self.status.value = "cancelling (finished chunks are kept; run again to resume)..."


    # ------------------------------------------------------------------ regions
    def _fov_region(self, layer: Image) -> tuple[int, int, int, int]:
        """The part of the slide on screen, in level-0 pixels (x, y, width, height)."""
        h, w = self._viewer.canvas.size
        zoom = self._viewer.camera.zoom
        cy, cx = self._viewer.camera.center[-2:]
        corners = np.array([[cy - h / zoom / 2, cx - w / zoom / 2], [cy + h / zoom / 2, cx + w / zoom / 2]])
        data = np.array([layer.world_to_data(c) for c in corners])
        return _clip_region(data, layer)

    def _rectangle_region(self, layer: Image) -> tuple[int, int, int, int] | None:
        shapes = self._viewer.layers.selection.active
        if not isinstance(shapes, Shapes):
            shapes = next((s for s in reversed(self._viewer.layers) if isinstance(s, Shapes) and len(s.data)), None)
        if shapes is None or not len(shapes.data):
            return None
        idx = max((i for i, t in enumerate(shapes.shape_type) if t == "rectangle"), default=len(shapes.data) - 1)
        world = np.array([shapes.data_to_world(p) for p in shapes.data[idx]])[:, -2:]
        data = np.array([layer.world_to_data(p) for p in world])
        return _clip_region(np.array([data.min(axis=0), data.max(axis=0)]), layer)

    def _output_path(self, layer: Image, region) -> Path:
        chosen = str(self.output.value)
        if chosen and chosen != ".":
            return Path(chosen)
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{layer.name}-{self.model.value}-{self.scope.value}-{self.assembly.value}")
        if region is not None:
            safe += "-" + "_".join(map(str, region))
        return Path(tempfile.gettempdir()) / "medseg-wsi" / f"{safe}.zarr"

    # ------------------------------------------------------------------ job events (GUI thread)
    def _on_progress(self, event: Progress) -> None:
        """Show the label pyramid once its first chunk is written, then refresh it now and then."""
        if self._request is None:
            return
        if self.result_layer is None and (self._request.output / "zarr.json").is_file() and event.partial:
            self._show_result(self._request.output)
        if event.partial and self.result_layer is not None:
            self.partial_updates += 1
            now = time.perf_counter()
            if now - self._last_refresh > REFRESH_S:
                self._last_refresh = now
                self.result_layer.refresh()

    def _on_result(self, outcome: WsiOutcome) -> None:
        self.result, self.objects = outcome.result, outcome.objects
        layer = self._show_result(outcome.result.path)
        layer.refresh()
        self._fill_table()
        r = outcome.result
        shown = "" if len(self.objects) <= MAX_TABLE_ROWS else f" (the table shows the first {MAX_TABLE_ROWS}; exports hold all)"
        self._report(f"{layer.name}: level {r.level}{r.grid_note()}, {r.tiles} tiles in {r.seconds:.1f} s ({r.tiles_tissue} of {r.tiles_grid} touch tissue); {len(self.objects)} objects{shown}.", "status")

    def _on_done(self) -> None:
        self._request = None

    # ------------------------------------------------------------------ results
    def _show_result(self, path: Path) -> Labels:
        """Add (or replace) the multiscale Labels layer of a result, aligned with its slide layer."""
        data, kwargs, _ = result_layer_data(path, name=f"{self.model.value} ({self._slide_layer.name if self._slide_layer else path.stem})")
        if self._slide_layer is not None:
            sy, sx = self._slide_layer.scale[-2:]
            (ry, rx) = kwargs["metadata"]["medseg"]["scale"]
            kwargs["scale"] = (ry * sy, rx * sx)
            kwargs["translate"] = ((ry - 1) / 2 * sy, (rx - 1) / 2 * sx)
        existing = next((lyr for lyr in self._viewer.layers if isinstance(lyr, Labels) and lyr.name == kwargs["name"]), None)
        if existing is not None:
            self._viewer.layers.remove(existing)
        self.result_layer = self._viewer.add_labels(data, **kwargs)
        return self.result_layer

    def _fill_table(self) -> None:
        """The first ``MAX_TABLE_ROWS`` objects (all of them go into the exports)."""
        rows = [[o.id, o.class_name, round(o.centroid_x, 1), round(o.centroid_y, 1), None if o.area_um2 is None else round(o.area_um2, 1),
                 None if o.perimeter_um is None else round(o.perimeter_um, 1), None if o.confidence != o.confidence else round(o.confidence, 3)]
                for o in self.objects[:MAX_TABLE_ROWS]]
        self.table.value = {c: [r[i] for r in rows] for i, c in enumerate(TABLE_COLUMNS)}
        enabled = self.result is not None
        self.export_csv_button.enabled = self.export_geojson_button.enabled = enabled

    def _on_row_clicked(self, row: int, _column: int = 0) -> None:
        if 0 <= row < len(self.objects):
            self.centre_on(self.objects[row])

    def centre_on(self, obj: SlideObject) -> None:
        """Centre the view on an object (and zoom in so that it is clearly visible)."""
        layer = self._slide_layer or self.slide.value
        world = np.asarray(layer.data_to_world((obj.centroid_y - 0.5, obj.centroid_x - 0.5))) if layer is not None else np.array([obj.centroid_y, obj.centroid_x])
        self._viewer.camera.center = tuple(world[-2:])
        if layer is not None:
            x0, y0, x1, y1 = obj.bbox
            extent = max(y1 - y0, x1 - x0) * float(max(layer.scale[-2:])) * 4
            self._viewer.camera.zoom = max(self._viewer.camera.zoom, min(self._viewer.canvas.size) / max(extent, 1e-6))

    def export_csv(self, path: str | Path) -> Path:
        return write_csv(self.objects, path)

    def export_geojson(self, path: str | Path, object_type: str | None = None) -> Path:
        from medseg.io.geojson import write_geojson

        assert self.result is not None
        return write_geojson(self.objects, path, self.result.classes, object_type=object_type or self.object_type.value, mpp=self.result.info.get("slide_mpp"))

    def _export_dialog(self, kind: str) -> None:
        from qtpy.QtWidgets import QFileDialog

        suffix = ".csv" if kind == "csv" else ".geojson"
        path, _ = QFileDialog.getSaveFileName(self.native, f"Export objects as {kind.upper()}", f"objects{suffix}", f"*{suffix}")
        if not path:
            return
        try:
            out = self.export_csv(path) if kind == "csv" else self.export_geojson(path)
        except MedsegError as exc:
            self._report(str(exc), "error")
            return
        self._report(f"{len(self.objects)} objects written to {out}", "info")

    # ------------------------------------------------------------------ helpers


def _clip_region(box: np.ndarray, layer: Image) -> tuple[int, int, int, int]:
    """(x, y, width, height) in level-0 pixels from [[y0, x0], [y1, x1]] data coordinates, clipped to the slide."""
    h, w = layer.metadata["medseg"]["levels"][0]["shape"]
    y0, x0 = np.floor(box[0][-2:]).astype(int)
    y1, x1 = np.ceil(box[1][-2:]).astype(int)
    y0, x0, y1, x1 = max(y0, 0), max(x0, 0), min(y1, h), min(x1, w)
    return (int(x0), int(y0), int(max(x1 - x0, 1)), int(max(y1 - y0, 1)))


__all__ = ["Refused", "WsiOutcome", "WsiRequest", "WsiWidget", "wsi_job"]
