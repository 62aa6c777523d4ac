"""The Compare dock widget: several model packs on the same image, side by side, with agreement and scores.

Thin by design: it gathers the image (the whole image, the field of view or the last rectangle of a
Shapes layer; the current frame or all frames of a stack), the models (installed packs and pack
folders) and an optional reference Labels layer, runs :func:`medseg.compare.compare_iter` through
:class:`~napari_medseg._widgets._job.JobRunner`, and shows the :class:`~medseg.compare.Comparison`:

- one Labels layer per model and a disagreement layer (0 where all models agree, else how many
  differ from the majority), either **side by side** in napari's grid mode (each over its own view
  of the image; all grid views share one camera, so panning and zooming stay linked) or
  **overlaid** on the image with a choice of which model is shown;
- the table of costs and scores (:func:`medseg.compare.summary_rows`) and a bar plot of the chosen
  column (:func:`medseg.compare.plot_metric`, matplotlib in the dock);
- **Adopt** copies one model's mask into a new editable Labels layer; the table exports as CSV and
  the figure as PNG.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Generator

import numpy as np
from magicgui.widgets import ComboBox, Container, FileEdit, Label, ProgressBar, PushButton, RadioButtons, Select, Table
from napari.layers import Image, Labels, Shapes
from napari.utils.colormaps import DirectLabelColormap

from medseg.compare import (
    CompareOptions,
    Comparison,
    compare_iter,
    default_metric,
    format_value,
    numeric_columns,
    plot_metric,
    save_figure,
    write_table_csv,
)
from medseg.engine import CancelToken, Progress
from medseg.errors import MedsegError
from medseg.io import describe_array
from medseg.train.packs import MANIFEST, available_packs
from napari_medseg._widgets._common import class_colormap, device_choices
from napari_medseg._widgets._job import JobDock, JobRunner, refusing
from napari_medseg._widgets.segment import _LayerImage, layer_mpp

if TYPE_CHECKING:
    import napari

WHOLE, FOV, RECTANGLE = "whole image", "field of view", "rectangle"
CURRENT_FRAME, ALL_FRAMES = "current frame", "all frames"
SIDE_BY_SIDE, OVERLAID = "side by side", "overlaid"
NO_REFERENCE = "(none)"
SHOW_ALL = "all models"
DISAGREEMENT = "disagreement"
ROLE = "medseg_compare"  # layer metadata key: "output", "backdrop" or "disagreement"
DISAGREEMENT_COLOURS = ["#ff8c00", "#e6194b", "#911eb4", "#000075"]


# --------------------------------------------------------------------------- the job (worker thread)
@dataclass
class CompareRequest:
    """Everything one comparison needs, gathered on the GUI thread."""

    layer_name: str
    data: Any  # the (cropped) image array
    rgb: bool
    models: list[str]  # pack ids or pack folders
    reference: np.ndarray | None
    options: CompareOptions
    frames: list[int] | None = None
    mpp: float | None = None
    offset: tuple[int, int] = (0, 0)  # (row, col) of the crop in the layer's data


@refusing
def compare_job(request: CompareRequest, cancel: CancelToken | None = None) -> Generator[Progress, None, Comparison]:
    """Describe the image once and compare the models on it (a :class:`MedsegError` comes back as Refused)."""
    yield Progress(0, 0, f"loading {len(request.models)} models")
    described = describe_array(np.asarray(request.data), rgb=request.rgb, source=f"Layer '{request.layer_name}'")
    image = _LayerImage(**vars(described), layer_name=request.layer_name)
    return (yield from compare_iter(image, request.models, request.reference, request.options, frames=request.frames,
                                    mpp=request.mpp, cancel=cancel))


# --------------------------------------------------------------------------- the widget (GUI thread)
class CompareWidget(JobDock, Container):
    """Compare model packs on one image: side by side or overlaid, with a table, a plot and adoption."""

    def __init__(self, napari_viewer: "napari.viewer.Viewer") -> None:
        super().__init__(labels=True)
        viewer = self._viewer = napari_viewer
        self._folders: dict[str, str] = {}  # extra pack folders: shown name -> path
        self.result: Comparison | None = None
        self._request: CompareRequest | None = None
        self._source: Image | None = None
        self._layers: dict[str, Labels] = {}  # model name (and DISAGREEMENT) -> layer
        self._pairs: list[tuple[Image, Labels]] = []  # (copy of the image, mask): one grid view each
        self._arranged: tuple[str, str] | None = None  # (view, shown) last laid out
        self._hidden: list[Any] = []  # layers hidden while the grid is on
        self.last_adopted: Labels | None = None

        self.image = ComboBox(label="image", choices=self._image_choices, tooltip="the image layer the models run on")
        self.region = RadioButtons(label="region", choices=[WHOLE, FOV, RECTANGLE], value=WHOLE, orientation="horizontal",
                                   tooltip="the whole image, the part on screen, or the last rectangle drawn in a Shapes layer")
        self.frames = RadioButtons(label="frames", choices=[CURRENT_FRAME, ALL_FRAMES], value=CURRENT_FRAME, orientation="horizontal",
                                   tooltip="for stacks: only the frame on screen, or every frame")
        self.models = Select(label="models", choices=self._model_choices, tooltip="packs to compare (select several)")
        self.folder = FileEdit(label="pack folder", mode="d", tooltip="a pack folder (manifest.json + weights) to add to the list")
        self.add_folder_button = PushButton(text="Add pack folder")
        self.reference = ComboBox(label="reference", choices=self._reference_choices, tooltip="a Labels layer to score the models against")
        self.device = ComboBox(label="device", choices=device_choices(), value="auto")
        self.run_button = PushButton(text="Compare")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(label="progress", min=0, max=1, value=0)
        self.status = Label(label="", value="")
        self.status.native.setWordWrap(True)
        self.view = RadioButtons(label="view", choices=[SIDE_BY_SIDE, OVERLAID], value=SIDE_BY_SIDE, orientation="horizontal",
                                 tooltip="side by side: napari's grid, one view per model, linked cameras; overlaid: on the image")
        self.show = ComboBox(label="show", choices=self._show_choices, tooltip="overlaid view: the model (or the disagreement map) shown")
        self.table = Table(value={"data": [], "index": [], "columns": []}, label="table")
        self.table.native.setMinimumHeight(140)
        self.metric = ComboBox(label="plot", choices=self._metric_choices, tooltip="the table column shown in the bar plot")
        self.plot_box = Container(labels=False)
        self.adopt_choice = ComboBox(label="adopt", choices=self._output_choices, tooltip="the model whose mask becomes a new editable layer")
        self.adopt_button = PushButton(text="Adopt this output")
        self.csv_path = FileEdit(label="table CSV", mode="w", filter="*.csv", value="comparison.csv")
        self.export_csv_button = PushButton(text="Export CSV")
        self.png_path = FileEdit(label="figure PNG", mode="w", filter="*.png", value="comparison.png")
        self.export_png_button = PushButton(text="Export PNG")

        self._make_plot()
        self.extend([
            self.image, self.region, self.frames, self.models, self.folder, self.add_folder_button, self.reference, self.device,
            Container(widgets=[self.run_button, self.cancel_button], layout="horizontal", labels=False), self.progress, self.status,
            self.view, self.show, self.table, self.metric, self.plot_box,
            Container(widgets=[self.adopt_choice, self.adopt_button], layout="horizontal", labels=False),
            self.csv_path, self.export_csv_button, self.png_path, self.export_png_button,
        ])
        self.jobs = JobRunner(run_buttons=[self.run_button], cancel_button=self.cancel_button, bar=self.progress, status=self.status)

        self.image.changed.connect(self._on_image_changed)
        self.add_folder_button.changed.connect(lambda *_: self.add_pack_folder(self.folder.value))
        self.run_button.changed.connect(self.run)
        self.cancel_button.changed.connect(self.cancel)
        self.view.changed.connect(self._on_view_changed)
        self.show.changed.connect(self._on_view_changed)
        self.metric.changed.connect(lambda *_: self._draw_plot())
        self.adopt_button.changed.connect(lambda *_: self.adopt())
        self.export_csv_button.changed.connect(lambda *_: self.export_csv())
        self.export_png_button.changed.connect(lambda *_: self.export_png())
        for emitter in (viewer.layers.events.inserted, viewer.layers.events.removed):
            emitter.connect(self._on_layers_changed)
        self.native.destroyed.connect(lambda *_: self.jobs.cancel())
        self._on_image_changed()

    # ------------------------------------------------------------------ choices
    def _image_choices(self, _widget=None) -> list[tuple[str, Image]]:
        return [(layer.name, layer) for layer in self._viewer.layers if isinstance(layer, Image) and ROLE not in layer.metadata]

    def _reference_choices(self, _widget=None) -> list[tuple[str, Any]]:
        return [(NO_REFERENCE, None)] + [(layer.name, layer) for layer in self._viewer.layers
                                         if isinstance(layer, Labels) and ROLE not in layer.metadata]

    def _model_choices(self, _widget=None) -> list[tuple[str, str]]:
        packs = [(pid, pid) for pid in sorted(available_packs())]
        return packs + [(name, path) for name, path in self._folders.items()]

    def _show_choices(self, _widget=None) -> list[str]:
        return [SHOW_ALL] + (self.result.names + [DISAGREEMENT] if self.result is not None else [])

    def _output_choices(self, _widget=None) -> list[str]:
        return self.result.names if self.result is not None else []

    def _metric_choices(self, _widget=None) -> list[str]:
        return numeric_columns(self.result.rows()) if self.result is not None else []

    def _on_layers_changed(self, _event=None) -> None:
        self.image.reset_choices()
        self.reference.reset_choices()

    def _on_image_changed(self, _value=None) -> None:
        layer = self.image.value
        self.frames.enabled = layer is not None and _spatial_ndim(layer) == 3

    def add_pack_folder(self, folder: str | Path) -> str | None:
        """Add a pack folder to the model list (and select it); returns its name there."""
        path = Path(folder)
        if not (path / MANIFEST).is_file():
            self.jobs.report(f"'{path}' is not a pack folder (no {MANIFEST} in it): choose the folder that holds manifest.json and the weights.", "error")
            return None
        resolved = path.resolve()
        name = resolved.parent.name if resolved.name == "pack" else resolved.name
        self._folders[name] = str(path)
        self.models.reset_choices()
        self.models.value = list(self.models.value) + [str(path)]
        return name

    # ------------------------------------------------------------------ the run
    def run(self, _value=None):
        """Start a comparison; returns the worker (``None`` when the choices are refused)."""
        if self.jobs.running:
            return None
        layer = self.image.value
        if layer is None:
            return self._refuse("No image layer to compare on: open an image (File > Open) or a sample and choose it under 'image'.")
        models = list(self.models.value)
        if not models:
            return self._refuse("No model chosen: select two or more packs under 'models' (or add a pack folder).")
        data = layer.data[0] if layer.multiscale else layer.data
        ndim = _spatial_ndim(layer)
        if ndim not in (2, 3):
            return self._refuse(f"Layer '{layer.name}' has {ndim} spatial dimensions: compare on a 2-D image or a (T, H, W) stack.")
        box = self._region_box(layer)
        if box is None:
            return None
        if layer.multiscale and self.region.value == WHOLE:
            return self._refuse(f"Layer '{layer.name}' is a multiscale slide: choose 'field of view' or 'rectangle' to compare on a part of it.")
        (y0, x0), (y1, x1) = box
        lead = (slice(None),) * (ndim - 2)
        crop = (*lead, slice(y0, y1), slice(x0, x1))
        frames = None
        if ndim == 3 and self.frames.value == CURRENT_FRAME:
            frames = [self._current_frame(layer)]
        reference = None
        ref_layer = self.reference.value
        if ref_layer is not None:
            ref = ref_layer.data[0] if ref_layer.multiscale else ref_layer.data
            if tuple(ref.shape) != _spatial_shape(layer):
                return self._refuse(f"Reference '{ref_layer.name}' has shape {tuple(ref.shape)} but the image '{layer.name}' {_spatial_shape(layer)}: "
                                    "choose the Labels layer drawn on this image.")
            reference = np.asarray(ref[crop])
        options = CompareOptions(device=self.device.value)
        self._request = CompareRequest(layer.name, data[crop + ((slice(None),) if layer.rgb else ())], bool(layer.rgb), models,
                                       reference, options, frames, layer_mpp(layer), (y0, x0))
        self._source = layer
        return self.jobs.start(compare_job, self._request, description=f"Comparing {len(models)} models on {layer.name}",
                               on_result=self._on_result)

    def _refuse(self, message: str) -> None:
        self.jobs.report(message, "error")
        return None

    def _current_frame(self, layer: Image) -> int:
        index = layer.world_to_data(self._viewer.dims.point)[0]
        return int(np.clip(round(float(index)), 0, layer.data.shape[0] - 1))

    def _region_box(self, layer: Image) -> tuple[tuple[int, int], tuple[int, int]] | None:
        """((y0, x0), (y1, x1)) in the layer's data pixels (level 0 of a slide), clipped to the image."""
        shape = _spatial_shape(layer)
        h, w = shape[-2:]
        if self.region.value == WHOLE:
            return (0, 0), (h, w)
        if self.region.value == FOV:
            ch, cw = self._viewer.canvas.size
            zoom = self._viewer.camera.zoom
            cy, cx = self._viewer.camera.center[-2:]
            corners = [np.array(self._viewer.dims.point, float) for _ in range(2)]
            corners[0][-2:] = (cy - ch / zoom / 2, cx - cw / zoom / 2)
            corners[1][-2:] = (cy + ch / zoom / 2, cx + cw / zoom / 2)
            data = np.array([layer.world_to_data(c)[-2:] for c in corners])
        else:
            shapes = next((s for s in reversed(self._viewer.layers) if isinstance(s, Shapes) and len(s.data)), None)
            if shapes is None:
                return self._refuse("No rectangle to compare on: draw one in a Shapes layer, or choose 'whole image' or 'field of view'.")
            idx = max((i for i, t in enumerate(shapes.shape_type) if t == "rectangle"), default=len(shapes.data) - 1)
            world = [shapes.data_to_world(p) for p in shapes.data[idx]]
            data = np.array([layer.world_to_data(p)[-2:] for p in world])
        y0, x0 = np.floor(data.min(axis=0)).astype(int)
        y1, x1 = np.ceil(data.max(axis=0)).astype(int)
        y0, x0, y1, x1 = max(y0, 0), max(x0, 0), min(y1, h), min(x1, w)
        if y1 - y0 < 8 or x1 - x0 < 8:
            return self._refuse(f"The {self.region.value} covers {max(y1 - y0, 0)} x {max(x1 - x0, 0)} pixels of '{layer.name}': "
                                "choose a part of the image at least 8 x 8 pixels.")
        return (int(y0), int(x0)), (int(y1), int(x1))

    # ------------------------------------------------------------------ results (GUI thread)
    def _on_result(self, result: Comparison) -> None:
        request, source = self._request, self._source
        if request is None or source is None or source not in self._viewer.layers:
            return
        self._clear_layers()
        colormap = class_colormap([SimpleNamespace(value=v, color=c) for v, c in result.colours.items()])
        translate, scale = self._placement(source, request)
        dis_colours = {None: (0, 0, 0, 0), 0: (0, 0, 0, 0)}
        dis_colours.update({k: DISAGREEMENT_COLOURS[min(k, len(DISAGREEMENT_COLOURS)) - 1] for k in range(1, len(result.outputs))})
        masks = [(o.name, o.labels, colormap, 0.6, "output") for o in result.outputs]
        masks.append((DISAGREEMENT, result.disagreement, DirectLabelColormap(color_dict=dis_colours), 0.7, "disagreement"))
        backdrop = np.asarray(request.data)
        layers, pairs = {}, []
        for name, mask, cmap, opacity, role in masks:
            image = self._viewer.add_image(backdrop, name=f"{name} · image", rgb=request.rgb, scale=scale, translate=translate,
                                           colormap=None if request.rgb else source.colormap.name, contrast_limits=source.contrast_limits,
                                           metadata={ROLE: "backdrop"})
            layers[name] = self._viewer.add_labels(self._full_frames(mask, source, request), name=f"{name} · compare", colormap=cmap,
                                                   opacity=opacity, scale=scale, translate=translate,
                                                   metadata={ROLE: role, "model": name, "source": source.name})
            pairs.append((image, layers[name]))
        self.result, self._layers, self._pairs = result, layers, pairs
        for widget in (self.show, self.metric, self.adopt_choice):
            widget.reset_choices()
        self.metric.value = default_metric(result.rows())
        self._fill_table()
        self._draw_plot()
        self._arrange()
        costs = ", ".join(f"{o.name} {o.seconds:.2f} s" for o in result.outputs)
        self.jobs.report(f"{len(result.outputs)} models: {costs}; all agree on {100 * result.full_agreement:.1f} % of pixels.")

    def _placement(self, source: Image, request: CompareRequest) -> tuple[list[float], list[float]]:
        """(translate, scale) that put a crop starting at ``request.offset`` where it lies in the source layer."""
        scale = list(source.scale)
        translate = list(source.translate)
        translate[-2] += request.offset[0] * scale[-2]
        translate[-1] += request.offset[1] * scale[-1]
        return translate, scale

    def _full_frames(self, labels: np.ndarray, source: Image, request: CompareRequest) -> np.ndarray:
        """A single compared frame goes back into a stack of the source's length (other frames empty)."""
        if request.frames is None:
            return labels
        stack = np.zeros((_spatial_shape(source)[0], *labels.shape[1:]), labels.dtype)
        stack[request.frames] = labels
        return stack

    def _clear_layers(self) -> None:
        self._restore_hidden()
        pairs, self._pairs, self._layers = self._pairs, [], {}
        for layer in (layer for pair in pairs for layer in pair):
            if layer in self._viewer.layers:
                self._viewer.layers.remove(layer)
        self._viewer.grid.enabled = False

    def _restore_hidden(self) -> None:
        for layer in self._hidden:
            if layer in self._viewer.layers:
                layer.visible = True
        self._hidden = []

    def _on_view_changed(self, _value=None) -> None:
        # napari resets a dock's choices on every layer event, which re-emits these values: lay out only on a real change
        if self._arranged != (self.view.value, self.show.value):
            self._arrange()

    def _arrange(self) -> None:
        """Side by side: each (image, mask) pair in its own grid view; overlaid: masks over the source image."""
        self._arranged = (self.view.value, self.show.value)
        layers = self._viewer.layers
        pairs = [(b, m) for b, m in self._pairs if b in layers and m in layers]
        if not pairs:
            return
        ours = {id(layer) for pair in pairs for layer in pair}
        if self.view.value == SIDE_BY_SIDE:
            for layer in layers:
                if id(layer) not in ours and layer.visible:
                    layer.visible = False
                    self._hidden.append(layer)
            for target, layer in enumerate(layer for pair in pairs for layer in pair):
                layer.visible = True
                layers.move(layers.index(layer), target)
            self._viewer.grid.stride = 2
            self._viewer.grid.enabled = True
            self._viewer.reset_view()  # fit the image in each (smaller) view
            self.show.enabled = False
        else:
            self._viewer.grid.enabled = False
            self._restore_hidden()
            shown = self.show.value
            for backdrop, labels in pairs:
                backdrop.visible = False
                name = labels.metadata.get("model")
                labels.visible = shown == SHOW_ALL and name != DISAGREEMENT or shown == name
                layers.move(layers.index(labels), len(layers))
            self.show.enabled = True

    # ------------------------------------------------------------------ table, plot
    def _fill_table(self) -> None:
        rows = self.result.rows() if self.result is not None else []
        columns = list(rows[0]) if rows else []
        self.table.value = {"data": [[format_value(c, r.get(c)) for c in columns] for r in rows], "index": [], "columns": columns}

    def _make_plot(self) -> None:
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.figure = Figure(figsize=(4, 2.6), dpi=90)
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(220)
        self.plot_box.native.layout().addWidget(self.canvas)

    def _draw_plot(self) -> None:
        if self.result is None or not self.metric.value:
            return
        plot_metric(self.result.rows(), self.metric.value, figure=self.figure)
        self.canvas.draw_idle()

    # ------------------------------------------------------------------ adopt, export
    def adopt(self, name: str | None = None) -> Labels | None:
        """Copy one model's mask into a new editable Labels layer over the image (the overlaid view)."""
        if self.result is None:
            return self._refuse("Nothing to adopt yet: run a comparison first.")
        name = name or self.adopt_choice.value
        source_layer = self._layers.get(name)
        if source_layer is None or source_layer not in self._viewer.layers:
            return self._refuse(f"The output of '{name}' is no longer in the viewer: run the comparison again.")
        self.view.value = OVERLAID
        layer = self._viewer.add_labels(np.array(source_layer.data, copy=True), name=f"{name} (adopted)", colormap=source_layer.colormap,
                                        scale=source_layer.scale, translate=source_layer.translate, opacity=0.7,
                                        metadata={"model": name, "adopted_from": "compare", "source": source_layer.metadata.get("source")})
        for labels in self._layers.values():
            labels.visible = False
        self._viewer.layers.selection.active = layer
        self.last_adopted = layer
        self.jobs.report(f"'{layer.name}' is a new Labels layer: edit it with napari's brush, fill and eraser.")
        return layer

    def export_csv(self, path: str | Path | None = None) -> Path | None:
        if self.result is None:
            return self._refuse("Nothing to export yet: run a comparison first.")
        try:
            out = write_table_csv(self.result.rows(), Path(path if path is not None else self.csv_path.value))
        except MedsegError as exc:
            return self._refuse(str(exc))
        self.jobs.report(f"table written to {out}", "info")
        return out

    def export_png(self, path: str | Path | None = None) -> Path | None:
        if self.result is None:
            return self._refuse("Nothing to export yet: run a comparison first.")
        try:
            out = save_figure(self.figure, Path(path if path is not None else self.png_path.value))
        except MedsegError as exc:
            return self._refuse(str(exc))
        self.jobs.report(f"figure written to {out}", "info")
        return out


def _spatial_shape(layer: Image) -> tuple[int, ...]:
    shape = tuple(layer.data[0].shape if layer.multiscale else layer.data.shape)
    return shape[:-1] if layer.rgb else shape


def _spatial_ndim(layer: Image) -> int:
    return len(_spatial_shape(layer))


__all__ = ["CompareRequest", "CompareWidget", "compare_job"]
