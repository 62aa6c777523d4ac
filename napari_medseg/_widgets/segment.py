"""The Segment dock widget: run a model pack on an image layer and add the result as a Labels layer.

Thin by design: it gathers choices, runs the core generator :meth:`medseg.engine.Predictor.predict_iter`
in napari's ``thread_worker`` (so the viewer stays responsive), drives a progress bar from its
:class:`~medseg.engine.Progress` events, and turns the returned :class:`~medseg.engine.Prediction`
into a layer. A :class:`~medseg.errors.MedsegError` becomes a notification, never a crash; a cancel
becomes an info notification.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generator

import numpy as np
# napari imports these lazily when the first Labels layer is made (features table, random label colours);
# importing them when the dock opens keeps about 0.7 s off the GUI thread at the end of the first run.
import pandas  # noqa: F401
import skimage.color.colorconv  # noqa: F401
from magicgui.widgets import CheckBox, ComboBox, Container, FloatSpinBox, Label, ProgressBar, PushButton, RadioButtons, SpinBox
from napari.layers import Image, Labels

from medseg.engine import CancelToken, PredictConfig, Prediction, Predictor, Progress
from medseg.io import ImageData, describe_array
from medseg.train.packs import available_packs, resolve
from napari_medseg._widgets._common import chosen_manifest, class_colormap, device_choices
from napari_medseg._widgets._job import JobDock, JobRunner, Refused, refusing

if TYPE_CHECKING:
    import napari

CURRENT_FRAME = "current frame"
ALL_FRAMES = "all frames"


def layer_mpp(layer: Image) -> float | None:
    """The layer's µm per pixel, from medseg's reader/sample metadata (None when not known)."""
    meta = layer.metadata.get("medseg", {}) if isinstance(layer.metadata, dict) else {}
    if meta.get("mpp"):
        return float(meta["mpp"])
    if meta.get("pixel_size") and meta.get("pixel_unit") in ("µm", "um", "micron", "microns"):
        return float(meta["pixel_size"])
    return None


# --------------------------------------------------------------------------- the job (worker thread)
@dataclass
class SegmentRequest:
    """Everything one run needs, gathered on the GUI thread."""

    layer_name: str
    data: Any  # the layer's array (numpy, dask, ...); converted in the worker
    rgb: bool
    pack_id: str
    config: PredictConfig
    frames: list[int] | None = None
    mpp: float | None = None  # the layer's µm per pixel, when known (the core resamples to the pack's)
    cancel: CancelToken = field(default_factory=CancelToken)


@dataclass
class _LayerImage(ImageData):
    """An :class:`ImageData` named after its layer, so the core's messages name the layer."""

    layer_name: str = "image"

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.layer_name


@refusing
def segment_job(request: SegmentRequest, cancel: CancelToken | None = None) -> Generator[Progress, None, Prediction]:
    """Load the pack and predict (a :class:`MedsegError` comes back as :class:`Refused` for the GUI to report)."""
    yield Progress(0, 0, f"loading {request.pack_id}")
    described = describe_array(np.asarray(request.data), rgb=request.rgb, source=f"Layer '{request.layer_name}'")
    image = _LayerImage(**vars(described), layer_name=request.layer_name)
    predictor = Predictor(resolve(request.pack_id), request.config)
    return (yield from predictor.predict_iter(image, frames=request.frames, cancel=cancel or request.cancel, mpp=request.mpp))


# --------------------------------------------------------------------------- the widget (GUI thread)
class SegmentWidget(JobDock, Container):
    """Segment an image layer (the current frame or all frames) with a model pack."""

    def __init__(self, napari_viewer: "napari.viewer.Viewer") -> None:  # napari passes the viewer by this name
        super().__init__(labels=True)
        viewer = self._viewer = napari_viewer
        self._request: SegmentRequest | None = None
        self._source: Image | None = None
        self.last_layer: Labels | None = None

        self.image = ComboBox(label="image", choices=self._image_choices, tooltip="the image layer to segment")
        self.frames = RadioButtons(label="frames", choices=[CURRENT_FRAME, ALL_FRAMES], value=CURRENT_FRAME, orientation="horizontal",
                                   tooltip="for stacks: only the frame on screen, or every frame")
        self.model = ComboBox(label="model", choices=self._pack_choices, tooltip="installed model packs (MEDSEG_MODELS and shipped packs)")
        self.model_info = Label(label="", value="")
        self.device = ComboBox(label="device", choices=device_choices(), value="auto")
        self.tile = SpinBox(label="tile size", min=16, max=8192, step=16, value=256, tooltip="pixels per tile side")
        self.overlap = FloatSpinBox(label="overlap", min=0.0, max=0.9, step=0.05, value=0.25, tooltip="fraction shared by neighbouring tiles")
        self.batch_size = SpinBox(label="batch size", min=1, max=1024, value=4, tooltip="tiles per forward pass")
        self.tta = CheckBox(label="flip averaging", value=False,
                            tooltip="test-time augmentation: average over the flips the pack was trained with (up to 4x slower)")
        self.run_button = PushButton(text="Run")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        buttons = Container(widgets=[self.run_button, self.cancel_button], layout="horizontal", labels=False)
        self.progress = ProgressBar(label="progress", min=0, max=1, value=0)
        self.status = Label(label="", value="")
        for label in (self.model_info, self.status):
            label.native.setWordWrap(True)  # long sentences wrap instead of widening the dock
        self.extend([self.image, self.frames, self.model, self.model_info, self.device, self.tile, self.overlap, self.batch_size,
                     self.tta, buttons, self.progress, self.status])
        self.jobs = JobRunner(run_buttons=[self.run_button], cancel_button=self.cancel_button, bar=self.progress, status=self.status)

        self.image.changed.connect(self._on_image_changed)
        self.model.changed.connect(self._on_model_changed)
        self.run_button.changed.connect(self.run)
        self.cancel_button.changed.connect(self.cancel)
        for emitter in (viewer.layers.events.inserted, viewer.layers.events.removed, viewer.layers.events.moved):
            emitter.connect(self.reset_choices)
        viewer.layers.selection.events.active.connect(self._on_active_layer)
        self.native.destroyed.connect(lambda *_: self.jobs.cancel())

        self._on_active_layer()
        self._on_image_changed()
        self._on_model_changed()

    # ------------------------------------------------------------------ choices
    def _image_choices(self, _widget=None) -> list[tuple[str, Image]]:
        return [(layer.name, layer) for layer in self._viewer.layers if isinstance(layer, Image)]

    def _pack_choices(self, _widget=None) -> list[str]:
        return sorted(available_packs())

    def _on_active_layer(self, _event=None) -> None:
        active = self._viewer.layers.selection.active
        if isinstance(active, Image) and not self.jobs.running and active in [c for _, c in self._image_choices()]:
            self.image.value = active

    def _on_image_changed(self, _value=None) -> None:
        layer = self.image.value
        self.frames.enabled = layer is not None and layer.ndim == 3

    def _on_model_changed(self, _value=None) -> None:
        manifest, reason = chosen_manifest(self.model.value, "no pack installed: add a folder of packs to MEDSEG_MODELS")
        if manifest is None:
            self.model_info.value = reason
            return
        self.tile.value = int(manifest.get("tile", self.tile.value))
        self.overlap.value = float(manifest.get("overlap", self.overlap.value))
        names = ", ".join(str(c.get("name")) for c in manifest.get("classes", []))
        mpp = manifest.get("mpp")
        self.model_info.value = f"classes: {names}" + (f"; trained at {mpp:g} µm/px" if mpp else "")

    # ------------------------------------------------------------------ actions
    def run(self, _value=None):
        """Start a run on the chosen layer; returns the worker (or ``None`` when the input is refused)."""
        if self.jobs.running:
            return None
        layer = self.image.value
        if layer is None:
            self._report("No image layer to segment: open an image (File > Open) or a sample (File > Open Sample > napari-medseg) and choose it under 'image'.", "error")
            return None
        if self.model.value is None:
            self._report("No model pack is installed: add a folder of packs to MEDSEG_MODELS or train one with 'medseg train', then reopen this widget.", "error")
            return None
        if layer.multiscale:
            self._report(f"Layer '{layer.name}' is multiscale (a slide): open one resolution level as a plain image layer to segment it here.", "error")
            return None
        frames = None
        if layer.ndim == 3 and self.frames.value == CURRENT_FRAME:
            frames = [self._current_frame(layer)]
        config = PredictConfig(tile=self.tile.value, overlap=self.overlap.value, batch_size=self.batch_size.value, device=self.device.value,
                               tta=self.tta.value)
        self._request = SegmentRequest(layer.name, layer.data, bool(layer.rgb), self.model.value, config, frames, layer_mpp(layer))
        self._source = layer
        what = f"frame {frames[0]} of " if frames else ""
        return self.jobs.start(segment_job, self._request, description=f"Segmenting {what}{layer.name} with {self.model.value}",
                               on_result=self._on_result, on_done=self._on_done)


    # ------------------------------------------------------------------ job outcome (GUI thread)
    def _on_result(self, prediction: Prediction) -> None:
        layer = self._add_result(prediction)
        self.jobs.report(f"{layer.name}: {prediction.tiles} tiles in {prediction.seconds:.1f} s.")

    def _on_done(self) -> None:
        self._request = None
        self._source = None


    def _current_frame(self, layer: Image) -> int:
        index = layer.world_to_data(self._viewer.dims.point)[0]
        return int(np.clip(round(float(index)), 0, layer.data.shape[0] - 1))

    def _add_result(self, prediction: Prediction) -> Labels:
        request, source = self._request, self._source
        assert request is not None and source is not None
        labels = prediction.labels
        existing = self._find_result_layer(request, source)
        if request.frames is not None:
            full_shape = (source.data.shape[0], *labels.shape[1:])
            stack = np.asarray(existing.data) if existing is not None and existing.data.shape == full_shape else np.zeros(full_shape, labels.dtype)
            stack = stack.astype(np.result_type(stack.dtype, labels.dtype), copy=False)
            stack[request.frames[0]] = labels[0]
            labels = stack
        metadata = {"model": request.pack_id, "source": source.name, "classes": {c.value: c.name for c in prediction.classes},
                    "seconds": prediction.seconds, "config": vars(request.config).copy()}
        if existing is not None and existing.data.shape == labels.shape:
            existing.data = labels
            existing.metadata.update(metadata)
            layer = existing
        else:
            layer = self._viewer.add_labels(
                labels,
                name=self._result_name(request.pack_id, source.name),
                colormap=class_colormap(prediction.classes),
                features={"index": [c.value for c in prediction.classes], "class": [c.name for c in prediction.classes]},
                metadata=metadata,
                scale=source.scale,
                translate=source.translate,
                opacity=0.6,
            )
            self._place_above(layer, source)
        self.last_layer = layer
        return layer

    def _result_name(self, pack_id: str, source_name: str) -> str:
        """The model's id; with the image's name when another image already has a result of that model."""
        return pack_id if pack_id not in self._viewer.layers else f"{pack_id} ({source_name})"

    def _place_above(self, layer: Labels, source: Image) -> None:
        """Keep a result directly above its image in the layer list."""
        layers = self._viewer.layers
        if source in layers:
            new, src = layers.index(layer), layers.index(source)
            if new != src + 1:
                layers.move(new, src + 1)

    def _find_result_layer(self, request: SegmentRequest, source: Image) -> Labels | None:
        for layer in self._viewer.layers:
            if isinstance(layer, Labels) and layer.metadata.get("model") == request.pack_id and layer.metadata.get("source") == source.name:
                return layer
        return None


__all__ = ["Refused", "SegmentRequest", "SegmentWidget", "segment_job"]
