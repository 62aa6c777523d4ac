"""The Multi-sequence dock: assign image layers to C0 / LGE / T2 (any may stay empty), run a multi-sequence
pack, get a Labels layer with the class names and a notice of the sequences used.

Thin by design: the layers' arrays, spacings and affines go to :func:`medseg.multiseq.study_from_arrays`
(which refuses sequences that do not share a grid, or none at all, with one sentence) and
:func:`medseg.multiseq.segment_study_iter` runs in a worker through :class:`JobRunner`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generator

import numpy as np
import pandas  # noqa: F401  (napari imports it lazily for the first Labels layer; keep that off the GUI thread)
from magicgui.widgets import CheckBox, ComboBox, Container, Label, ProgressBar, PushButton
from napari.layers import Image, Labels

from medseg.engine import CancelToken, Progress
from medseg.multiseq import SEQUENCES, MultiseqResult, segment_study_iter, study_from_arrays
from medseg.train.packs import available_packs
from napari_medseg._nifti_io import from_layer_array, to_layer_array
from napari_medseg._widgets._common import chosen_manifest, class_colormap, device_choices
from napari_medseg._widgets._job import JobDock, JobRunner, refusing

if TYPE_CHECKING:
    import napari

NONE = "(none)"
_NAME_HINTS = {"C0": ("c0", "bssfp", "cine"), "LGE": ("lge", "de", "late"), "T2": ("t2",)}


def layer_geometry(layer: Image) -> tuple[tuple[float, float, float], np.ndarray | None]:
    """Voxel spacing (X, Y, Z) and affine of a layer: from the NIfTI reader's metadata, else from its scale."""
    meta = layer.metadata.get("medseg", {}) if isinstance(layer.metadata, dict) else {}
    if meta.get("spacing_mm") and len(meta["spacing_mm"]) == 3:
        affine = np.asarray(meta["affine"]) if meta.get("affine") is not None else None
        return tuple(float(v) for v in meta["spacing_mm"]), affine  # type: ignore[return-value]
    scale = [float(v) for v in layer.scale]
    if len(scale) == 2:
        return (scale[0], scale[1], 1.0), None
    return (scale[-2], scale[-1], scale[-3]), None


@dataclass
class MultiseqRequest:
    arrays: dict[str, Any]
    spacings: dict[str, tuple[float, float, float]]
    affines: dict[str, np.ndarray | None]
    sources: dict[str, str]
    pack_id: str
    device: str
    tta: bool = False


@refusing
def multiseq_job(request: MultiseqRequest, cancel: CancelToken | None = None) -> Generator[Progress, None, MultiseqResult]:
    """Build the study from the layers (checking the grid) and segment it."""
    yield Progress(0, 0, f"loading {request.pack_id}")
    arrays = {s: (from_layer_array(np.asarray(a)) if a is not None else None) for s, a in request.arrays.items()}
    study = study_from_arrays(arrays, request.spacings, request.sources, request.affines,
                              hint="assign at least one image layer to C0, LGE or T2.")
    return (yield from segment_study_iter(study, request.pack_id, request.device, cancel, tta=request.tta))


class MultiseqWidget(JobDock, Container):
    """Segment a cardiac MRI study from whichever of its sequences are open as image layers."""

    def __init__(self, napari_viewer: "napari.viewer.Viewer") -> None:
        super().__init__(labels=True)
        self._viewer = napari_viewer
        self._reference: Image | None = None
        self.last_layer: Labels | None = None
        self.last_result: MultiseqResult | None = None
        self.sequence_boxes: dict[str, ComboBox] = {}
        for s in SEQUENCES:
            self.sequence_boxes[s] = ComboBox(label=s, choices=self._layer_choices, tooltip=f"the image layer holding the {s} sequence, or (none)")
        self.model = ComboBox(label="model", choices=self._pack_choices, tooltip="installed multi-sequence packs")
        self.model_info = Label(label="", value="")
        self.device = ComboBox(label="device", choices=device_choices(), value="auto")
        self.tta = CheckBox(label="flip averaging", value=False,
                            tooltip="test-time augmentation: average over the flips the pack was trained with (up to 4x slower)")
        self.run_button = PushButton(text="Run")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        buttons = Container(widgets=[self.run_button, self.cancel_button], layout="horizontal", labels=False)
        self.progress = ProgressBar(label="progress", min=0, max=1, value=0)
        self.status = Label(label="", value="")
        self.used = Label(label="used", value="")
        for label in (self.model_info, self.status, self.used):
            label.native.setWordWrap(True)
        self.extend([*self.sequence_boxes.values(), self.model, self.model_info, self.device, self.tta, buttons, self.progress, self.status, self.used])
        self.jobs = JobRunner(run_buttons=[self.run_button], cancel_button=self.cancel_button, bar=self.progress, status=self.status)
        self.model.changed.connect(self._on_model_changed)
        self.run_button.changed.connect(self.run)
        self.cancel_button.changed.connect(self.cancel)
        for emitter in (napari_viewer.layers.events.inserted, napari_viewer.layers.events.removed):
            emitter.connect(self._on_layers_changed)
        self.native.destroyed.connect(lambda *_: self.jobs.cancel())
        self._on_layers_changed()
        self._on_model_changed()

    # ------------------------------------------------------------------ choices
    def _layer_choices(self, _widget=None) -> list[tuple[str, Any]]:
        return [(NONE, None)] + [(layer.name, layer) for layer in self._viewer.layers if isinstance(layer, Image) and not layer.rgb]

    def _pack_choices(self, _widget=None) -> list[str]:
        return sorted(available_packs(kind="multisequence"))

    def _on_layers_changed(self, _event=None) -> None:
        """Refresh the choices and fill empty boxes with layers whose names say which sequence they are."""
        self.reset_choices()
        taken = {box.value for box in self.sequence_boxes.values() if box.value is not None}
        for s, box in self.sequence_boxes.items():
            if box.value is not None:
                continue
            for _, layer in self._layer_choices()[1:]:
                words = layer.name.lower().replace("/", " ").replace("_", " ").replace("-", " ").replace(".", " ").split()
                if layer not in taken and any(h in words for h in _NAME_HINTS[s]):
                    box.value = layer
                    taken.add(layer)
                    break

    def _on_model_changed(self, _value=None) -> None:
        manifest, reason = chosen_manifest(self.model.value, "no multi-sequence pack installed: add a folder of packs to MEDSEG_MODELS")
        if manifest is None:
            self.model_info.value = reason
            return
        names = ", ".join(str(c.get("name")) for c in manifest.get("classes", []) if c.get("value"))
        self.model_info.value = f"takes {', '.join(manifest.get('sequences', []))}; classes: {names}"

    # ------------------------------------------------------------------ actions
    def assign(self, **layers: Image | None) -> None:
        """Set the layer of each named sequence (``C0=..., LGE=..., T2=...``; None empties a box)."""
        self.reset_choices()
        for s, layer in layers.items():
            self.sequence_boxes[s].value = layer

    def run(self, _value=None):
        """Start a run; returns the worker, or ``None`` when the input is refused."""
        if self.jobs.running:
            return None
        if self.model.value is None:
            self._report("No multi-sequence pack is installed: add a folder of packs to MEDSEG_MODELS, then reopen this widget.", "error")
            return None
        chosen = {s: box.value for s, box in self.sequence_boxes.items() if box.value is not None}
        if not chosen:
            self._report("No sequence given: assign at least one image layer to C0, LGE or T2.", "error")
            return None
        if len(set(map(id, chosen.values()))) < len(chosen):
            self._report("One layer is assigned to two sequences: give each sequence its own layer.", "error")
            return None
        geometry = {s: layer_geometry(layer) for s, layer in chosen.items()}
        request = MultiseqRequest(
            arrays={s: layer.data for s, layer in chosen.items()},
            spacings={s: g[0] for s, g in geometry.items()},
            affines={s: g[1] for s, g in geometry.items()},
            sources={s: f"layer '{layer.name}'" for s, layer in chosen.items()},
            pack_id=self.model.value,
            device=self.device.value,
            tta=self.tta.value,
        )
        self._reference = next(iter(chosen.values()))
        return self.jobs.start(multiseq_job, request, description=f"Segmenting {', '.join(chosen)} with {self.model.value}",
                               on_result=self._on_result)

    # ------------------------------------------------------------------ result (GUI thread)
    def _on_result(self, result: MultiseqResult) -> None:
        reference = self._reference
        data = to_layer_array(result.labels)
        if reference is not None and reference.ndim == 2:
            data = data[0]
        metadata = {"model": result.pack_id, "sequences": result.used, "fusion_weights": result.weights,
                    "classes": {c.value: c.name for c in result.classes}, "seconds": result.seconds}
        name = result.pack_id if result.pack_id not in self._viewer.layers else f"{result.pack_id} ({'+'.join(result.used)})"
        layer = self._viewer.add_labels(
            data,
            name=name,
            colormap=class_colormap(result.classes),
            features={"index": [c.value for c in result.classes], "class": [c.name for c in result.classes]},
            metadata=metadata,
            scale=reference.scale if reference is not None else None,
            translate=reference.translate if reference is not None else None,
            opacity=0.6,
        )
        self.last_layer, self.last_result = layer, result
        self.used.value = result.notice()
        self.jobs.report(result.notice(), "info")


__all__ = ["MultiseqRequest", "MultiseqWidget", "layer_geometry", "multiseq_job"]
