"""The Click dock: point-and-click segmentation of one object at a time.

Click on the object (left click = positive; Shift-, Ctrl- or right click = negative) and the current
object is shown live; ``u`` takes back the last click, ``Enter`` accepts the object into the objects
Labels layer as a new label (earlier labels are never overwritten) and starts the next one, ``n``
drops the current object. In box mode a rectangle drawn on the "click box" layer gives the object
the pack finds inside it. Each click runs the core :class:`medseg.interactive.ClickSession` off the GUI
thread through :class:`JobRunner`; the session (pack loaded, window predictions cached) lives as long
as the image, its frame and the pack stay the same. On a stack of frames the clicks work on the frame
on screen and accepted objects go to that frame of the objects layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generator

import numpy as np
from magicgui.widgets import CheckBox, ComboBox, Container, Label, ProgressBar, PushButton
from napari.layers import Image, Labels, Points, Shapes

from medseg.engine import CancelToken, Progress
from medseg.interactive.clicks import Box, Click
from medseg.interactive.session import ClickSession, Step
from medseg.train.packs import available_packs, read_manifest, resolve
from napari_medseg._widgets._common import device_choices
from napari_medseg._widgets._job import JobDock, JobRunner, refusing
from napari_medseg._widgets.segment import layer_mpp

if TYPE_CHECKING:
    import napari

NEGATIVE_MODIFIERS = {"Shift", "Control", "Meta"}
POSITIVE_COLOUR, NEGATIVE_COLOUR = "#00e000", "#ff2020"
CLICKS, CURRENT, BOX = "clicks", "current object", "click box"
CLICK_SLACK = 3.0  # image pixels a press may move before it counts as a drag


@dataclass
class ClickRequest:
    """One click (or box) and what is needed to build the session if there is none yet."""

    action: Click | Box
    session: ClickSession | None
    data: Any
    rgb: bool
    pack_id: str
    mpp: float | None
    device: str
    bf16: bool


@refusing
def click_job(request: ClickRequest, cancel: CancelToken | None = None) -> Generator[Progress, None, tuple[ClickSession, Step]]:
    """Apply a click (or box) to the session, building it first when needed; returns (session, step)."""
    session = request.session
    if session is None:
        yield Progress(0, 0, f"loading {request.pack_id}")
        session = ClickSession(np.asarray(request.data), resolve(request.pack_id), mpp=request.mpp, rgb=request.rgb, device=request.device, bf16=request.bf16)
    yield Progress(0, 0, "segmenting")
    action = request.action
    step = session.set_box(action) if isinstance(action, Box) else session.add(action)
    return session, step


class ClickWidget(JobDock, Container):
    """Point-and-click segmentation of an image layer, one object at a time."""

    def __init__(self, napari_viewer: "napari.viewer.Viewer") -> None:
        super().__init__(labels=True)
        self._viewer = viewer = napari_viewer
        self.session: ClickSession | None = None
        self._session_key: tuple | None = None
        self._pending: list[Click | Box] = []
        self.objects_layer: Labels | None = None
        self.clicks_layer: Points | None = None
        self.current_layer: Labels | None = None
        self.box_layer: Shapes | None = None
        self.active = False

        self.image = ComboBox(label="image", choices=self._image_choices, tooltip="the image layer to click on")
        self.model = ComboBox(label="model", choices=lambda _w=None: sorted(available_packs()), tooltip="interactive packs (…-click) follow the clicks; automatic packs use the object under the click")
        self.model_info = Label(label="", value="")
        self.device = ComboBox(label="device", choices=device_choices(), value="auto")
        self.bf16 = CheckBox(label="bf16 on CPU", value=True, tooltip="bf16 arithmetic on the CPU: about twice as fast per click")
        self.box_mode = CheckBox(label="box mode", value=False, tooltip="draw a rectangle around the object on the 'click box' layer instead of clicking")
        self.start_button = PushButton(text="Start clicking")
        self.undo_button = PushButton(text="Undo click (u)")
        self.accept_button = PushButton(text="Accept object (Enter)")
        self.next_button = PushButton(text="Drop object (n)")
        buttons = Container(widgets=[self.undo_button, self.accept_button, self.next_button], layout="horizontal", labels=False)
        self.progress = ProgressBar(label="progress", min=0, max=1, value=0)
        self.status = Label(label="", value="left click: inside the object; Shift/Ctrl/right click: outside it")
        for label in (self.model_info, self.status):
            label.native.setWordWrap(True)
        self.extend([self.image, self.model, self.model_info, self.device, self.bf16, self.box_mode, self.start_button, buttons, self.progress, self.status])
        self.jobs = JobRunner(bar=self.progress, status=self.status)

        self.model.changed.connect(self._on_model_changed)
        self.image.changed.connect(lambda _v=None: self._forget_session())
        self.start_button.changed.connect(self.toggle)
        self.undo_button.changed.connect(lambda _v=None: self.undo())
        self.accept_button.changed.connect(lambda _v=None: self.accept())
        self.next_button.changed.connect(lambda _v=None: self.next_object())
        self.box_mode.changed.connect(self._on_box_mode)
        for emitter in (viewer.layers.events.inserted, viewer.layers.events.removed):
            emitter.connect(self.reset_choices)
        self.native.destroyed.connect(lambda *_: self._teardown())
        self._on_model_changed()

    # ------------------------------------------------------------------ choices
    def _image_choices(self, _widget=None) -> list[tuple[str, Image]]:
        return [(layer.name, layer) for layer in self._viewer.layers if isinstance(layer, Image)]

    def _on_model_changed(self, _value=None) -> None:
        self._forget_session()
        pack_id = self.model.value
        if pack_id is None:
            self.model_info.value = "no pack installed: add a folder of packs to MEDSEG_MODELS"
            return
        manifest = read_manifest(available_packs()[pack_id])
        kind = "interactive: follows positive and negative clicks" if manifest.get("interactive") else "automatic: keeps the object under each click"
        self.model_info.value = kind

    def _forget_session(self) -> None:
        self.session, self._session_key = None, None

    # ------------------------------------------------------------------ start / stop
    def toggle(self, _value=None) -> None:
        self.stop() if self.active else self.start()

    def start(self) -> bool:
        """Make the click layers for the chosen image and listen to mouse clicks; False when refused."""
        layer = self.image.value
        if layer is None:
            self.jobs.report("No image layer to click on: open an image or a sample and choose it under 'image'.", "error")
            return False
        if layer.multiscale or layer.ndim not in (2, 3):
            self.jobs.report(f"Layer '{layer.name}' is not a 2-D image or a stack of frames: open one slide region as an image layer to click on it.", "error")
            return False
        if self.model.value is None:
            self.jobs.report("No model pack is installed: add a folder of packs to MEDSEG_MODELS, then reopen this dock.", "error")
            return False
        viewer = self._viewer
        if self.objects_layer is None or self.objects_layer not in viewer.layers:
            shape = layer.data.shape[: layer.ndim]  # (H, W), or (T, H, W) for a stack: objects go to their frame
            self.objects_layer = viewer.add_labels(np.zeros(shape, np.uint32), name=f"{layer.name} objects", scale=layer.scale, translate=layer.translate, opacity=0.5)
        if self.current_layer is None or self.current_layer not in viewer.layers:
            self.current_layer = viewer.add_labels(np.zeros(layer.data.shape[layer.ndim - 2 : layer.ndim], np.uint8), name=CURRENT, scale=layer.scale[-2:], translate=layer.translate[-2:], opacity=0.6)
            self.current_layer.colormap = {None: (0, 0, 0, 0), 0: (0, 0, 0, 0), 1: "#ffd700"}
        if self.clicks_layer is None or self.clicks_layer not in viewer.layers:
            self.clicks_layer = viewer.add_points(np.zeros((0, 2)), name=CLICKS, size=8, face_color=POSITIVE_COLOUR, scale=layer.scale[-2:], translate=layer.translate[-2:])
            for key, action in (("u", self.undo), ("Enter", self.accept), ("n", self.next_object)):
                self.clicks_layer.bind_key(key, lambda _layer, act=action: act(), overwrite=True)
        self.clicks_layer.mode = "pan_zoom"
        if self._on_mouse not in viewer.mouse_drag_callbacks:
            viewer.mouse_drag_callbacks.append(self._on_mouse)
            viewer.dims.events.current_step.connect(self._on_frame_changed)
        viewer.layers.selection.active = self.clicks_layer
        self.active = True
        self.start_button.text = "Stop clicking"
        self.jobs.report("click on an object (Shift/Ctrl/right click: outside it)")
        return True

    def stop(self) -> None:
        if self._on_mouse in self._viewer.mouse_drag_callbacks:
            self._viewer.mouse_drag_callbacks.remove(self._on_mouse)
            self._viewer.dims.events.current_step.disconnect(self._on_frame_changed)
        self.active = False
        self.start_button.text = "Start clicking"

    def _teardown(self) -> None:
        self.jobs.cancel()
        self.stop()

    # ------------------------------------------------------------------ input
    def _on_mouse(self, viewer, event):
        """Viewer mouse callback: a press and release within a few pixels is a click on the object (a drag pans)."""
        if not self.active or self.box_mode.value or event.type != "mouse_press" or self.image.value is None:
            return
        layer = self.image.value
        start = np.asarray(layer.world_to_data(event.position)[-2:], float)
        negative = event.button == 2 or bool(NEGATIVE_MODIFIERS & {str(m) for m in (event.modifiers or ())})
        yield
        while event.type == "mouse_move":
            yield
        end = np.asarray(layer.world_to_data(event.position)[-2:], float)
        if np.hypot(*(end - start)) > CLICK_SLACK:
            return
        self.click(start[1], start[0], positive=not negative)

    def click(self, x: float, y: float, positive: bool = True):
        """Add a click at image column ``x``, row ``y``; returns the worker (None when queued or refused)."""
        if not self.active and not self.start():
            return None
        click = Click(float(x), float(y), positive)
        self._show_click(click)
        return self._submit(click)

    def frame(self) -> int | None:
        """The frame on screen of a stack layer (None for a 2-D image)."""
        layer = self.image.value
        if layer is None or layer.ndim != 3:
            return None
        index = layer.world_to_data(self._viewer.dims.point)[0]
        return int(np.clip(round(float(index)), 0, layer.data.shape[0] - 1))

    def _on_frame_changed(self, _event=None) -> None:
        """Another frame of a stack: the object being clicked stays on its frame; start the next one."""
        if self._session_key is not None and self.frame() != self._session_key[1] and not self.jobs.running:
            self._forget_session()
            self.next_object()

    def _on_box_mode(self, on: bool) -> None:
        viewer = self._viewer
        if on:
            if not self.active and not self.start():
                self.box_mode.value = False
                return
            if self.box_layer is None or self.box_layer not in viewer.layers:
                layer = self.image.value
                self.box_layer = viewer.add_shapes(name=BOX, edge_color="#ffd700", face_color="transparent", edge_width=2, scale=layer.scale[-2:], translate=layer.translate[-2:])
                self.box_layer.events.data.connect(self._on_box_drawn)
            self.box_layer.mode = "add_rectangle"
            viewer.layers.selection.active = self.box_layer
        elif self.clicks_layer is not None and self.clicks_layer in viewer.layers:
            viewer.layers.selection.active = self.clicks_layer

    def _on_box_drawn(self, event=None) -> None:
        if getattr(event, "action", "added") not in ("added", None) or self.box_layer is None or not len(self.box_layer.data):
            return
        corners = np.asarray(self.box_layer.data[-1])[:, -2:]
        (r0, c0), (r1, c1) = corners.min(axis=0), corners.max(axis=0)
        self.draw_box(c0, r0, c1, r1)

    def draw_box(self, x0: float, y0: float, x1: float, y1: float):
        """Start the object from a box (image pixels); returns the worker (None when queued or refused)."""
        if not self.active and not self.start():
            return None
        if self.clicks_layer is not None:
            self.clicks_layer.data = np.zeros((0, 2))
        return self._submit(Box.from_corners(x0, y0, x1, y1))

    def _show_click(self, click: Click) -> None:
        layer = self.clicks_layer
        colours = list(np.asarray(layer.face_color)) if len(layer.data) else []
        layer.data = np.vstack([np.asarray(layer.data).reshape(-1, 2), [[click.y, click.x]]])
        layer.face_color = np.asarray(colours + [_rgba(POSITIVE_COLOUR if click.positive else NEGATIVE_COLOUR)])

    # ------------------------------------------------------------------ jobs
    def _submit(self, action: Click | Box):
        if self.jobs.running:
            self._pending.append(action)
            return None
        layer = self.image.value
        frame = self.frame()
        key = (id(layer), frame, self.model.value, self.device.value, self.bf16.value)
        if key != self._session_key:
            self.session, self._session_key = None, key
        data = layer.data if frame is None else layer.data[frame]
        request = ClickRequest(action, self.session, data, bool(layer.rgb), self.model.value, layer_mpp(layer), self.device.value, self.bf16.value)
        return self.jobs.start(click_job, request, description="click", on_result=self._on_result, on_done=self._on_done)

    def _on_result(self, outcome: tuple[ClickSession, Step]) -> None:
        self.session, step = outcome
        self._show_current()
        note = f" ({step.note})" if step.note else ""
        self.jobs.report(f"{int(step.mask.sum())} pixels after {len(self.session.steps)} step(s), {1000 * step.seconds:.0f} ms{note}")

    def _on_done(self) -> None:
        kept = len(self.session.clicks) if self.session is not None else 0
        queued = sum(isinstance(a, Click) for a in self._pending)
        if self.clicks_layer is not None and len(self.clicks_layer.data) > kept + queued:  # the last click was refused
            self._drop_last_point()
        if self._pending and not self.jobs.running:
            self._submit(self._pending.pop(0))

    def _drop_last_point(self) -> None:
        layer = self.clicks_layer
        if layer is not None and len(layer.data):
            colours = np.asarray(layer.face_color)[:-1]
            layer.data = np.asarray(layer.data)[:-1]
            if len(colours):
                layer.face_color = colours

    def _show_current(self) -> None:
        if self.current_layer is not None:
            mask = self.session.mask if self.session is not None else None
            self.current_layer.data = np.zeros(self.current_layer.data.shape, np.uint8) if mask is None else mask.astype(np.uint8)

    # ------------------------------------------------------------------ object actions
    def undo(self) -> bool:
        """Take back the last click (or the box)."""
        if self.jobs.running or self.session is None or not self.session.undo():
            return False
        if self.clicks_layer is not None and len(self.clicks_layer.data) > len(self.session.clicks):
            self._drop_last_point()
        self._show_current()
        self.jobs.report(f"click taken back; {len(self.session.steps)} step(s) left")
        return True

    def accept(self) -> int:
        """Commit the current object as a new label where the objects layer is still empty; returns its label (0 if none)."""
        if self.jobs.running or self.session is None or not self.session.mask.any() or self.objects_layer is None:
            self.jobs.report("There is no object to accept: click on an object first.")
            return 0
        data = np.array(self.objects_layer.data)  # a copy: the layer is given a new array
        frame = self._session_key[1] if self._session_key is not None else None
        target = data if frame is None or data.ndim == 2 else data[frame]  # a view into the copy
        label = int(data.max()) + 1
        free = self.session.mask & (target == 0)
        if not free.any():
            self.jobs.report("The object lies entirely under earlier objects: nothing new to accept.")
            return 0
        target[free] = label
        self.objects_layer.data = data
        self.next_object()
        self.jobs.report(f"object {label} accepted ({int(free.sum())} pixels); click on the next object")
        return label

    def next_object(self) -> None:
        """Start the next object: clear the clicks, the box and the current object."""
        if self.session is not None:
            self.session.reset()
        self._pending.clear()
        if self.clicks_layer is not None:
            self.clicks_layer.data = np.zeros((0, 2))
        if self.box_layer is not None and len(self.box_layer.data):
            with self.box_layer.events.data.blocker():
                self.box_layer.data = []
        self._show_current()


def _rgba(colour: str) -> np.ndarray:
    from napari.utils.colormaps.standardize_color import transform_color

    return transform_color(colour)[0]


__all__ = ["ClickRequest", "ClickWidget", "click_job"]
