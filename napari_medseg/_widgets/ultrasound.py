"""The Ultrasound dock widget: segment pubic symphysis and fetal head, measure AoP and HSD, draw them.

Thin by design. It gathers choices and calls the core: :func:`medseg.measure.ultrasound.ultrasound_job`
(segment the current frame or all frames with a pack, then measure) or
:func:`~medseg.measure.ultrasound.measure_frames_iter` (measure an existing Labels layer, e.g. a
reference mask), both in napari's ``thread_worker``; a :class:`~medseg.errors.MedsegError` becomes a
notification. Then it turns the rows into layers and a table:

- a Shapes layer of lines (symphysis axis, tangent line, HSD segment; the fitted ellipses with the
  ellipse method) carrying the AoP and HSD values as text,
- a Points layer of the key points (V vertex, E other symphysis end, T tangent point, H HSD point),
- a per-frame table (frame, AoP, HSD, plane class, reason when not measurable), exportable as CSV.

"Summarise loop" runs :func:`medseg.measure.keyframes.summarise_loop_iter` on the image stack (frame
features from the segmentation pack, FullTransNet key frames from the ``ultrasound-keyframes`` pack),
marks the key frames in a Points layer (one labelled marker per key frame, visible on that frame) and
lets the two arrow buttons jump to the next or previous key frame.

The two layers show the frame on screen and follow the frame slider. Editing the measured Labels
layer (paint, fill, erase, undo, or replacing its data) re-measures the edited frame(s) on the GUI
thread after a short debounce: one frame takes a few milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generator, Sequence

import numpy as np
import pandas as pd
from magicgui.widgets import ComboBox, Container, FileEdit, Label, ProgressBar, PushButton, RadioButtons, Table
from napari.layers import Image, Labels, Points, Shapes
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QAbstractScrollArea, QHeaderView, QStyledItemDelegate

from medseg.engine import CancelToken, PredictConfig, Progress
from medseg.errors import MedsegError
from medseg.io import ImageData, describe_array
from medseg.measure.keyframes import DEFAULT_SUMMARISER, LoopSummary, summarise_loop_iter
from medseg.measure.ultrasound import (
    DEFAULT_PACK, METHODS, FrameMeasurement, UltrasoundResult, measure_frame, measure_frames_iter, plane_class, structure_values,
    summary, ultrasound_job, write_csv,
)
from medseg.train.packs import available_packs, read_manifest
from napari_medseg._widgets._common import class_colormap, device_choices
from napari_medseg._widgets._job import JobDock, JobRunner, refusing

if TYPE_CHECKING:
    import napari

CURRENT_FRAME = "current frame"
ALL_FRAMES = "all frames"
DEBOUNCE_MS = 120
# paint: strokes, fills, erasing (with the touched indices); labels_update: every dab; data: the array replaced;
# set_data: any refresh, e.g. after undo/redo (checked against a digest of the frame, since slicing fires it too)
_EDIT_EVENTS = ("paint", "labels_update", "data", "set_data")
TABLE_COLUMNS = ["frame", "AoP (°)", "HSD (px)", "HSD (mm)", "plane", "status"]
COLOURS = {"axis": "#ff5050", "tangent": "#ffd700", "hsd": "#00e5ff", "ellipse": "#b0b0ff"}
POINT_COLOURS = {"V": "#ff5050", "E": "#ff9090", "T": "#ffd700", "H": "#00e5ff"}


# --------------------------------------------------------------------------- jobs (worker thread)
@dataclass
class UltrasoundRequest:
    """Everything one run needs, gathered on the GUI thread."""

    layer_name: str
    data: Any
    rgb: bool
    pack_id: str
    method: str
    spacing: tuple[float, float] | None = None
    frames: list[int] | None = None
    config: PredictConfig = field(default_factory=PredictConfig)
    cancel: CancelToken = field(default_factory=CancelToken)


@dataclass
class Measured:
    """Rows of a measure-only run."""

    rows: list[FrameMeasurement]


@refusing
def segment_and_measure_job(request: UltrasoundRequest, cancel: CancelToken | None = None) -> Generator[Progress, None, UltrasoundResult]:
    image = describe_array(np.asarray(request.data), rgb=request.rgb, source=f"Layer '{request.layer_name}'")
    image = ImageData(**{**vars(image), "spacing": request.spacing})
    return (yield from ultrasound_job(image, request.pack_id, request.config, frames=request.frames, method=request.method,
                                      stem=request.layer_name, cancel=cancel or request.cancel))


@refusing
def measure_job(labels: np.ndarray, frames: list[int], spacing, method: str, stem: str, ps_value: int, fh_value: int,
                cancel: CancelToken | None = None) -> Generator[Progress, None, Measured]:
    rows = yield from measure_frames_iter(labels, spacing, method, stem, frames, ps_value, fh_value, cancel=cancel)
    return Measured(rows)


summarise_job = refusing(summarise_loop_iter)


# --------------------------------------------------------------------------- the widget (GUI thread)
class UltrasoundWidget(JobDock, Container):
    """Segment PS and FH with a pack (or take a Labels layer), measure AoP/HSD per frame, draw and tabulate them."""

    def __init__(self, napari_viewer: "napari.viewer.Viewer") -> None:
        super().__init__(labels=True)
        viewer = self._viewer = napari_viewer
        self._pending: dict[str, Any] = {}
        self._watched: Labels | None = None
        self._muted = False  # True while this widget writes the Labels data itself
        self._dirty: set[int] = set()
        self.rows: dict[int, FrameMeasurement] = {}
        self._digests: dict[int, int] = {}  # crc32 of each measured frame, to notice edits that fire no paint event
        self.shapes_layer: Shapes | None = None
        self.points_layer: Points | None = None
        self.key_summary: LoopSummary | None = None
        self.keys_layer: Points | None = None

        self.image = ComboBox(label="image", choices=self._image_choices, tooltip="the ultrasound image, DICOM or video layer to segment")
        self.labels_choice = ComboBox(label="labels", choices=self._labels_choices,
                               tooltip="the segmentation to measure (0 background, pubic symphysis, fetal head); Run fills it from the model")
        self.frames = RadioButtons(label="frames", choices=[CURRENT_FRAME, ALL_FRAMES], value=CURRENT_FRAME, orientation="horizontal",
                                   tooltip="for stacks and videos: only the frame on screen, or every frame")
        self.model = ComboBox(label="model", choices=self._pack_choices, tooltip=f"model pack that segments PS and FH (default {DEFAULT_PACK})")
        self.method = ComboBox(label="method", choices=list(METHODS), value="contour",
                               tooltip="contour: the IUGC 2024 evaluator's rules; ellipse: the toolkit's ellipse-fit variant")
        self.device = ComboBox(label="device", choices=device_choices(), value="auto")
        self.run_button = PushButton(text="Segment + measure")
        self.measure_button = PushButton(text="Measure labels")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        buttons = Container(widgets=[self.run_button, self.measure_button, self.cancel_button], layout="horizontal", labels=False)
        self.summarise_button = PushButton(text="Summarise loop", tooltip=f"pick the key frames of the image stack ({DEFAULT_SUMMARISER} pack)")
        self.previous_key_button = PushButton(text="◀ key frame", enabled=False)
        self.next_key_button = PushButton(text="key frame ▶", enabled=False)
        keys = Container(widgets=[self.summarise_button, self.previous_key_button, self.next_key_button], layout="horizontal", labels=False)
        self.progress = ProgressBar(label="progress", min=0, max=1, value=0)
        self.status = Label(label="", value="")
        self.status.native.setWordWrap(True)
        self.table = Table(value={"data": [], "index": [], "columns": TABLE_COLUMNS}, label="per frame")
        self.table.read_only = True
        self.table.native.verticalHeader().setVisible(False)  # the frame column says it
        self.table.native.setItemDelegate(QStyledItemDelegate(self.table.native))  # show "82.7", not magicgui's "82.7000"
        self.table.native.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        self.table.native.setSizeAdjustPolicy(QAbstractScrollArea.SizeAdjustPolicy.AdjustIgnored)
        self.native.setMinimumWidth(420)  # room for the labels beside the choices
        self.csv_path = FileEdit(label="CSV", mode="w", filter="*.csv", value="biometry.csv")
        self.export_button = PushButton(text="Export CSV")
        self.extend([self.image, self.labels_choice, self.frames, self.model, self.method, self.device, buttons, keys, self.progress, self.status,
                     self.table, self.csv_path, self.export_button])
        self.jobs = JobRunner(run_buttons=[self.run_button, self.measure_button, self.summarise_button], cancel_button=self.cancel_button, bar=self.progress,
                              status=self.status)

        self._timer = QTimer()
        self._timer.setSingleShot(True)
        self._timer.setInterval(DEBOUNCE_MS)
        self._timer.timeout.connect(self._remeasure_dirty)

        self.run_button.changed.connect(self.run)
        self.measure_button.changed.connect(self.measure)
        self.cancel_button.changed.connect(self.cancel)
        self.summarise_button.changed.connect(self.summarise)
        self.next_key_button.changed.connect(lambda *_: self.jump_key(+1))
        self.previous_key_button.changed.connect(lambda *_: self.jump_key(-1))
        self.export_button.changed.connect(lambda *_: self.export_csv())
        self.labels_choice.changed.connect(self._on_labels_changed)
        self.method.changed.connect(self._on_method_changed)
        self.image.changed.connect(self._on_image_changed)
        for emitter in (viewer.layers.events.inserted, viewer.layers.events.removed, viewer.layers.events.moved):
            emitter.connect(self._on_layers_changed)
        viewer.dims.events.current_step.connect(self._on_step)
        self.table.native.cellClicked.connect(self._on_table_click)
        self.native.destroyed.connect(self._on_destroyed)
        if DEFAULT_PACK in self._pack_choices():
            self.model.value = DEFAULT_PACK
        self._on_image_changed()
        self._on_labels_changed()

    # ------------------------------------------------------------------ choices
    def _image_choices(self, _widget=None) -> list[tuple[str, Image]]:
        return [(layer.name, layer) for layer in self._viewer.layers if isinstance(layer, Image)]

    def _labels_choices(self, _widget=None) -> list[tuple[str, Labels]]:
        return [(layer.name, layer) for layer in self._viewer.layers if isinstance(layer, Labels)]

    def _pack_choices(self, _widget=None) -> list[str]:
        return sorted(available_packs())

    def _on_layers_changed(self, _event=None) -> None:
        self.reset_choices()
        if self.shapes_layer is not None and self.shapes_layer not in self._viewer.layers:
            self.shapes_layer = None
        if self.points_layer is not None and self.points_layer not in self._viewer.layers:
            self.points_layer = None

    def _on_image_changed(self, _value=None) -> None:
        layer = self.image.value
        stack = (layer is not None and layer.ndim >= 3) or (self.labels_choice.value is not None and self.labels_choice.value.ndim >= 3)
        self.frames.enabled = bool(stack)

    def _on_labels_changed(self, _value=None) -> None:
        """Watch the chosen Labels layer's edits; forget measurements of another layer."""
        layer = self.labels_choice.value
        if layer is self._watched:
            return
        self._unwatch()
        self.rows = {}
        self._digests = {}
        self._refresh_table()
        self._draw()
        if layer is not None:
            for name in _EDIT_EVENTS:
                getattr(layer.events, name).connect(self._on_labels_edited)
            self._watched = layer
        self._on_image_changed()

    def _unwatch(self) -> None:
        if self._watched is not None:
            for name in _EDIT_EVENTS:
                try:
                    getattr(self._watched.events, name).disconnect(self._on_labels_edited)
                except (TypeError, RuntimeError, ValueError):
                    pass
        self._watched = None

    def _on_method_changed(self, _value=None) -> None:
        if self.rows and self.labels_choice.value is not None:
            self._remeasure(sorted(self.rows))

    # ------------------------------------------------------------------ actions
    def run(self, _value=None):
        """Segment the image (current frame or all frames) with the pack, then measure; returns the worker or None."""
        if self.jobs.running:
            return None
        layer = self.image.value
        if layer is None:
            return self._refuse("No image layer: open an ultrasound image, DICOM or video (File > Open) and choose it under 'image'.")
        if self.model.value is None:
            return self._refuse(f"No model pack is installed: add the '{DEFAULT_PACK}' pack (or another PS/FH pack) to MEDSEG_MODELS, "
                                "or load a mask as a Labels layer and press 'Measure labels'.")
        if layer.ndim > 3 or getattr(layer, "multiscale", False):
            return self._refuse(f"Layer '{layer.name}' is not a 2-D image or a stack of frames: open one frame sequence as a plain image layer.")
        frames = None
        if layer.ndim == 3 and self.frames.value == CURRENT_FRAME:
            frames = [self._current_frame_of(layer)]
        try:
            manifest = read_manifest(available_packs()[self.model.value])
        except (KeyError, MedsegError) as exc:
            return self._refuse(str(exc))
        config = PredictConfig(tile=int(manifest.get("tile", 256)), overlap=float(manifest.get("overlap", 0.25)), device=self.device.value)
        request = UltrasoundRequest(layer.name, layer.data, bool(layer.rgb), self.model.value, self.method.value, _layer_spacing(layer),
                                    frames, config)
        self._pending = {"kind": "segment", "source": layer, "request": request}
        return self.jobs.start(segment_and_measure_job, request, on_result=self._on_result, on_done=self._on_done,
                               description=f"segmenting {'frame %d of ' % frames[0] if frames else ''}{layer.name} with {request.pack_id}")

    def measure(self, _value=None):
        """Measure the chosen Labels layer (current frame or all frames); returns the worker or None."""
        if self.jobs.running:
            return None
        layer = self.labels_choice.value
        if layer is None:
            return self._refuse("No Labels layer to measure: load a mask (0 background, 1 pubic symphysis, 2 fetal head) or press 'Segment + measure'.")
        data = np.asarray(layer.data)
        if data.ndim == 2:
            frames, stack = [0], data
        elif data.ndim == 3:
            frames = list(range(data.shape[0])) if self.frames.value == ALL_FRAMES else [self._current_frame_of(layer)]
            stack = data[frames]
        else:
            return self._refuse(f"Labels layer '{layer.name}' has {data.ndim} dimensions: measure 2-D frames or (T, H, W) stacks.")
        ps, fh = self._structure_values(layer)
        self._pending = {"kind": "measure", "labels": layer}
        return self.jobs.start(measure_job, stack, frames, self._spacing_for(layer), self.method.value, layer.name, ps, fh,
                               on_result=self._on_result, on_done=self._on_done, description=f"measuring {len(frames)} frame(s) of {layer.name}")

    def summarise(self, _value=None):
        """Pick the key frames of the image stack with the summariser pack; returns the worker or None."""
        if self.jobs.running:
            return None
        layer = self.image.value
        if layer is None or layer.ndim != 3 or getattr(layer, "multiscale", False):
            return self._refuse("Summarising needs a loop: choose an image layer that is a stack of frames (a cine loop, video or multi-frame DICOM).")
        if DEFAULT_SUMMARISER not in available_packs("sequence"):
            return self._refuse(f"The key-frame pack '{DEFAULT_SUMMARISER}' is not installed: add it to MEDSEG_MODELS.")
        if self.model.value is None:
            return self._refuse(f"No segmentation pack is installed to take frame features from: add '{DEFAULT_PACK}' to MEDSEG_MODELS.")
        self._pending = {"kind": "summarise", "source": layer}
        return self.jobs.start(summarise_job, layer.data, self.model.value, DEFAULT_SUMMARISER, on_result=self._on_summary,
                               on_done=self._on_done, description=f"summarising {layer.name}")

    def jump_key(self, direction: int) -> int | None:
        """Move the frame slider to the next (+1) or previous (-1) key frame; returns that frame."""
        layer = self._pending_source_or_image()
        if self.key_summary is None or layer is None:
            return None
        current = self._current_frame_of(layer)
        frame = self.key_summary.next_key(current) if direction > 0 else self.key_summary.previous_key(current)
        if frame is not None:
            axis = self._viewer.dims.ndim - layer.ndim
            self._viewer.dims.set_point(axis, float(layer.data_to_world([frame] + [0] * (layer.ndim - 1))[0]))
        return frame

    def _pending_source_or_image(self):
        layer = getattr(self, "_keys_source", None)
        return layer if layer is not None and layer in self._viewer.layers else self.image.value

    def _on_summary(self, result: LoopSummary) -> None:
        layer = self._pending.get("source")
        if layer is None or layer not in self._viewer.layers:
            return
        self.key_summary, self._keys_source = result, layer
        h = layer.data.shape[1]
        data = np.array([[k, 0.04 * h, 0.04 * h] for k in result.key_frames], float).reshape(-1, 3)
        text = {"string": [f"key frame {k} (score {result.scores[k]:.2f})" for k in result.key_frames], "color": "#ffd700",
                "anchor": "upper_left", "size": 10}
        name = f"{layer.name} key frames"
        if self.keys_layer is not None and self.keys_layer in self._viewer.layers:
            self._viewer.layers.remove(self.keys_layer)
        self.keys_layer = self._viewer.add_points(data, name=name, size=0.03 * h, face_color="#ffd700", text=text,
                                                  scale=tuple(layer.scale), translate=tuple(layer.translate))
        self.keys_layer.metadata["key_frames"] = list(result.key_frames)
        self.next_key_button.enabled = self.previous_key_button.enabled = bool(result.key_frames)
        measurable = int((result.quality[result.key_frames] > 0).sum()) if result.key_frames else 0
        self._report(f"{len(result.key_frames)} key frame(s) of {len(result.scores)}: {', '.join(map(str, result.key_frames))} "
                     f"({measurable} show both structures)", "status")

    def export_csv(self, path: str | Path | None = None) -> Path | None:
        """Write the table (all measured frames, in frame order) as CSV; returns the path or None."""
        if not self.rows:
            self._report("Nothing to export yet: measure a Labels layer or run 'Segment + measure' first.", "error")
            return None
        target = Path(path if path is not None else self.csv_path.value)
        try:
            out = write_csv([self.rows[f] for f in sorted(self.rows)], target)
        except MedsegError as exc:
            self._report(str(exc), "error")
            return None
        self._report(f"{len(self.rows)} frame(s) written to {out}", "info")
        return out


    # ------------------------------------------------------------------ job outcome (GUI thread)
    def _on_result(self, outcome: UltrasoundResult | Measured) -> None:
        if isinstance(outcome, UltrasoundResult):
            layer = self._add_labels(outcome)
            rows = outcome.rows
        else:
            layer = self._pending.get("labels")
            rows = outcome.rows
        if layer is None or layer not in self._viewer.layers:
            return
        if self.labels_choice.value is not layer:
            self.labels_choice.value = layer  # watches it and clears rows of the previous layer
        for r in rows:
            self.rows[r.frame] = r
            self._digests[r.frame] = self._digest(r.frame, layer)
        self._refresh_table()
        self._draw()
        self._report(summary(rows), "status")

    def _on_done(self) -> None:
        self._pending = {}

    def _on_destroyed(self, *_args) -> None:
        self.jobs.cancel()
        self._timer.stop()
        self._unwatch()
        try:
            self._viewer.dims.events.current_step.disconnect(self._on_step)
        except (TypeError, RuntimeError, ValueError):
            pass

    # ------------------------------------------------------------------ labels result
    def _add_labels(self, result: UltrasoundResult) -> Labels:
        """Put the segmentation into a Labels layer named after the pack (one per image), merging a single frame."""
        source: Image = self._pending["source"]
        request: UltrasoundRequest = self._pending["request"]
        labels = result.labels
        spatial_shape = source.data.shape[:-1] if source.rgb else source.data.shape
        name = f"{request.pack_id} ({source.name})"
        existing = self._viewer.layers[name] if name in self._viewer.layers else None
        if request.frames is not None:  # one frame of a stack
            full = (spatial_shape[0], *labels.shape[1:])
            stack = np.asarray(existing.data) if isinstance(existing, Labels) and existing.data.shape == full else np.zeros(full, labels.dtype)
            stack = stack.astype(np.result_type(stack.dtype, labels.dtype), copy=False)
            stack[request.frames[0]] = labels[0]
            labels = stack
        metadata = {"model": request.pack_id, "source": source.name, "classes": {c.value: c.name for c in result.classes},
                    "spacing_mm": result.spacing}
        self._muted = True
        try:
            if isinstance(existing, Labels) and existing.data.shape == labels.shape:
                existing.data = labels
                existing.metadata.update(metadata)
                return existing
            layer = self._viewer.add_labels(labels, name=name, colormap=class_colormap(result.classes), metadata=metadata,
                                            scale=source.scale[-labels.ndim:], translate=source.translate[-labels.ndim:], opacity=0.5)
            return layer
        finally:
            self._muted = False

    # ------------------------------------------------------------------ live re-measurement
    def _on_labels_edited(self, event=None) -> None:
        if self._muted or self._watched is None or not self.rows:  # live updates once the layer has been measured
            return
        if getattr(event, "type", "") == "set_data":
            f = self._current_frame_of(self._watched)
            if f in self.rows and self._digest(f) == self._digests.get(f):
                return  # a refresh or a new slice, not an edit
            frames = {f}
        else:
            frames = _touched_frames(event, self._watched)
        if frames is None:  # the whole data was replaced: every measured frame
            frames = set(self.rows)
        if not frames:
            frames = {self._current_frame_of(self._watched)}
        self._dirty |= frames
        self._timer.start()  # restarts: one re-measurement after the edits settle

    def _remeasure_dirty(self) -> None:
        frames, self._dirty = sorted(self._dirty), set()
        if frames:
            self._remeasure(frames)

    def _remeasure(self, frames: Sequence[int]) -> None:
        """Measure some frames of the watched layer synchronously (a few ms each) and redraw."""
        layer = self.labels_choice.value
        if layer is None:
            return
        data = layer.data
        ps, fh = self._structure_values(layer)
        spacing = self._spacing_for(layer)
        method = self.method.value
        for f in frames:
            if data.ndim == 3 and not 0 <= f < data.shape[0]:  # the layer lost frames: forget them
                self.rows.pop(int(f), None)
                continue
            frame = np.asarray(data[f] if data.ndim == 3 else data)
            if frame.ndim != 2:
                continue
            self._digests[int(f)] = _crc(frame)
            b = measure_frame(frame, spacing, method, ps, fh)
            self.rows[int(f)] = FrameMeasurement(layer.name, int(f), method, plane_class(frame, ps, fh), b)
        self._refresh_table([int(f) for f in frames if int(f) in self.rows])
        self._draw()
        current = self.rows.get(self._current_frame_of(layer))
        if current is not None:
            self.jobs.report(_describe(current))

    # ------------------------------------------------------------------ drawing
    def _on_step(self, _event=None) -> None:
        if self.rows:
            self._draw()

    def _draw(self) -> None:
        """Show the measurement of the frame on screen as a Shapes layer (lines + values) and a Points layer."""
        layer = self.labels_choice.value
        row = self.rows.get(self._current_frame_of(layer)) if layer is not None else None
        if row is None and self.shapes_layer is None and self.points_layer is None:
            return
        shapes, types, colours, texts = [], [], [], []
        points, names = [], []
        if row is not None:
            b = row.biometry
            if b.vertex is not None and b.other_end is not None:
                shapes.append(np.array([b.other_end, b.vertex], float))
                types.append("line"), colours.append(COLOURS["axis"]), texts.append("")
            if b.vertex is not None and b.tangent is not None:
                v, t = np.asarray(b.vertex, float), np.asarray(b.tangent, float)
                far = v + (t - v) * 1.25  # run on a little past the touching point, like a ruler
                shapes.append(np.array([v, far]))
                types.append("line"), colours.append(COLOURS["tangent"]), texts.append(f"AoP {b.aop:.1f}°" if b.aop is not None else "")
            if b.vertex is not None and b.hsd_point is not None:
                shapes.append(np.array([b.vertex, b.hsd_point], float))
                mm = f" ({b.hsd_mm:.1f} mm)" if b.hsd_mm is not None else ""
                types.append("line"), colours.append(COLOURS["hsd"]), texts.append(f"HSD {b.hsd:.1f} px{mm}" if b.hsd is not None else "")
            for ellipse in (getattr(b, "ps_ellipse", None), getattr(b, "fh_ellipse", None)):
                if ellipse is not None:
                    shapes.append(ellipse.outline())
                    types.append("polygon"), colours.append(COLOURS["ellipse"]), texts.append("")
            for key, p in (("V", b.vertex), ("E", b.other_end), ("T", b.tangent), ("H", b.hsd_point)):
                if p is not None:
                    points.append(np.asarray(p, float)), names.append(key)
        scale, translate = (tuple(layer.scale[-2:]), tuple(layer.translate[-2:])) if layer is not None else ((1.0, 1.0), (0.0, 0.0))
        base = layer.name if layer is not None else "ultrasound"
        selection = self._viewer.layers.selection
        active, selected = selection.active, set(selection)
        created = self.shapes_layer is None or self.points_layer is None
        self._draw_shapes(base, shapes, types, colours, texts, scale, translate)
        self._draw_points(base, points, names, scale, translate)
        if created and active is not None and active in self._viewer.layers:  # new layers take the selection: give it back
            selection.clear()
            selection.update(selected & set(self._viewer.layers))
            selection.active = active

    def _draw_shapes(self, base, shapes, types, colours, texts, scale, translate) -> None:
        layer = self.shapes_layer
        if layer is None:
            if not shapes:
                return
            layer = self.shapes_layer = self._viewer.add_shapes(
                ndim=2, name=f"{base} biometry", scale=scale, translate=translate, edge_width=1.5, face_color="transparent",
                features={"label": np.array([], dtype=object)},
                text={"string": "{label}", "color": "white", "size": 10, "anchor": "center"},  # values at the middle of their lines
            )
        else:
            layer.scale, layer.translate = scale, translate
        layer.data = []
        if shapes:
            layer.add(shapes, shape_type=types, edge_color=colours, edge_width=1.5, face_color="transparent")
        layer.features = pd.DataFrame({"label": texts})
        layer.refresh()

    def _draw_points(self, base, points, names, scale, translate) -> None:
        layer = self.points_layer
        if layer is None:
            if not points:
                return
            layer = self.points_layer = self._viewer.add_points(
                np.zeros((0, 2)), ndim=2, name=f"{base} key points", scale=scale, translate=translate, size=5, border_width=0,
                features={"label": np.array([], dtype=object)},
                text={"string": "{label}", "color": "white", "size": 9, "anchor": "upper_left", "translation": [-4, 4]},
            )
        else:
            layer.scale, layer.translate = scale, translate
        layer.data = np.asarray(points, float).reshape(-1, 2)
        layer.features = pd.DataFrame({"label": names})
        if names:
            layer.face_color = [POINT_COLOURS[n] for n in names]
        layer.refresh()

    # ------------------------------------------------------------------ table
    def _refresh_table(self, frames: Sequence[int] | None = None) -> None:
        """Rewrite the table, or only the rows of ``frames`` when the table already lists the same frames."""
        listed = sorted(self.rows)
        if frames is not None and list(self.table.row_headers) == listed:
            for f in frames:
                self.table.data[listed.index(f)] = _table_row(self.rows[f])
            return
        self.table.value = {"data": [_table_row(self.rows[f]) for f in listed], "index": listed, "columns": TABLE_COLUMNS}

    def _on_table_click(self, row: int, _column: int) -> None:
        frames = sorted(self.rows)
        layer = self.labels_choice.value
        if layer is None or not 0 <= row < len(frames) or layer.ndim < 3:
            return
        axis = self._viewer.dims.ndim - layer.ndim  # the layer's first axis in world order
        world = layer.data_to_world([frames[row]] + [0] * (layer.ndim - 1))
        self._viewer.dims.set_point(axis, float(world[0]))

    # ------------------------------------------------------------------ helpers
    def _refuse(self, message: str) -> None:
        self._report(message, "error")
        return None


    def _current_frame_of(self, layer: Image | Labels | None) -> int:
        """The frame of ``layer`` on screen (0 for 2-D layers)."""
        if layer is None or layer.ndim < 3:
            return 0
        index = layer.world_to_data(self._viewer.dims.point)[0]
        return int(np.clip(round(float(index)), 0, layer.data.shape[0] - 1))

    def _digest(self, frame: int, layer: Labels | None = None) -> int | None:
        layer = layer if layer is not None else self.labels_choice.value
        if layer is None:
            return None
        data = layer.data
        if data.ndim == 3:
            return _crc(np.asarray(data[frame])) if 0 <= frame < data.shape[0] else None
        return _crc(np.asarray(data))

    def _structure_values(self, layer: Labels) -> tuple[int, int]:
        classes = layer.metadata.get("classes")
        if isinstance(classes, dict) and classes:
            return structure_values([_NamedValue(int(v), str(n)) for v, n in classes.items()])
        return 1, 2

    def _spacing_for(self, layer: Labels) -> tuple[float, float] | None:
        spacing = layer.metadata.get("spacing_mm")
        if spacing is None and self.image.value is not None:
            spacing = _layer_spacing(self.image.value)
        return tuple(float(s) for s in spacing) if spacing is not None else None


@dataclass(frozen=True)
class _NamedValue:
    value: int
    name: str


def _layer_spacing(layer) -> tuple[float, float] | None:
    """(row, col) mm from the reader's metadata (``medseg.spacing_mm``), else None."""
    meta = layer.metadata.get("medseg", {}) if isinstance(layer.metadata, dict) else {}
    spacing = meta.get("spacing_mm") if isinstance(meta, dict) else None
    return (float(spacing[0]), float(spacing[1])) if spacing is not None else None


def _touched_frames(event, layer: Labels) -> set[int] | None:
    """Frames an edit event touched: from the paint history atoms; None when the whole data was replaced."""
    if event is None or getattr(event, "type", "") == "data":
        return None
    if layer.ndim < 3:
        return {0}
    atoms = getattr(event, "value", None) if getattr(event, "type", "") == "paint" else None
    if not atoms:
        return set()
    frames: set[int] = set()
    for atom in atoms:
        indices = atom[0]
        if len(indices) == layer.ndim and np.size(indices[0]):
            frames.update(int(f) for f in np.unique(np.asarray(indices[0])))
    return frames


def _crc(array: np.ndarray) -> int:
    import zlib

    return zlib.crc32(np.ascontiguousarray(array).view(np.uint8).data)


def _fmt(v: float | None, digits: int = 1) -> str:
    return "" if v is None else f"{v:.{digits}f}"


def _table_row(r: FrameMeasurement) -> list[Any]:
    return [r.frame, _fmt(r.aop_deg), _fmt(r.hsd_px), _fmt(r.hsd_mm), r.plane, "ok" if r.ok else r.reason]


def _describe(r: FrameMeasurement) -> str:
    if r.ok:
        mm = f" ({r.hsd_mm:.1f} mm)" if r.hsd_mm is not None else ""
        return f"frame {r.frame}: AoP {r.aop_deg:.1f}°, HSD {r.hsd_px:.1f} px{mm}"
    return f"frame {r.frame}: not measurable: {r.reason}"


__all__ = ["UltrasoundRequest", "UltrasoundWidget", "measure_job", "segment_and_measure_job"]
