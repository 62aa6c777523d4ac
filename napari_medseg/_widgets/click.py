"""The Click dock: point-and-click segmentation of one object at a time.

Click on the object (left click = positive; Shift-, Ctrl- or right click = negative) and the current
object is shown live; ``u`` takes back the last click, ``Enter`` accepts the object into the objects
Labels layer as a new label (earlier labels are never overwritten) and starts the next one, ``n``
drops the current object. In box mode a rectangle drawn on the "click box" layer gives the object
the pack finds inside it. Each click runs the core :class:`medseg.interactive.ClickSession` off the GUI
thread through :class:`JobRunner`; the session (pack loaded, window predictions cached) lives as long
as the image, its frame and the pack stay the same. On a stack of frames the clicks work on the frame
on screen and accepted objects go to that frame of the objects layer. On a slide (multiscale layer)
each object is clicked on a region read from the pyramid level nearest the pack's µm/px, and accepted
objects become outlines (level-0 pixels) in a Shapes layer.
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
from medseg.errors import MedsegError
from medseg.train.packs import available_packs, find_pack, read_manifest, resolve
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

    action: Click | Box | None  # None: build the session and prepare the first click (ClickSession.prepare)
    session: ClickSession | None
    data: Any
    rgb: bool
    pack_id: str
    mpp: float | None
    device: str
    bf16: bool
    region: tuple[int, int, int, int] | None = None  # slides: (y0, x0, h, w) of ``data`` (one pyramid level) to read


@refusing
def click_job(request: ClickRequest, cancel: CancelToken | None = None) -> Generator[Progress, None, tuple[ClickSession, Step | None]]:
    """Apply a click (or box) to the session, building it first when needed; returns (session, step).
    Without an action, build the session and prepare its first click; returns (session, None)."""
    session = request.session
    if session is None:
        yield Progress(0, 0, f"loading {request.pack_id}")
        data = request.data
        if request.region is not None:  # a region of one pyramid level of a slide, read here, off the GUI thread
            y0, x0, h, w = request.region
            data = data[y0 : y0 + h, x0 : x0 + w]
        session = ClickSession(np.asarray(data), resolve(request.pack_id), mpp=request.mpp, rgb=request.rgb, device=request.device, bf16=request.bf16)
    action = request.action
    if action is None:
        yield Progress(0, 0, "preparing the first click")
        session.prepare()
        return session, None
    yield Progress(0, 0, "segmenting")
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
        self._region: SlideRegion | None = None

        self.image = ComboBox(label="image", choices=self._image_choices, tooltip="the image layer to click on")
        self.model = ComboBox(label="model", choices=lambda _w=None: sorted({**available_packs(), **available_packs("interactive")}), tooltip="interactive packs (…-click) follow the clicks; automatic packs use the object under the click")
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
        manifest = read_manifest(find_pack(pack_id))
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
        if layer.ndim not in (2, 3) or (layer.multiscale and layer.ndim != 2):
            self.jobs.report(f"Layer '{layer.name}' is not a 2-D image, a stack of frames or a slide: choose a 2-D image layer.", "error")
            return False
        if self.model.value is None:
            self.jobs.report("No model pack is installed: add a folder of packs to MEDSEG_MODELS, then reopen this dock.", "error")
            return False
        viewer = self._viewer
        if self.objects_layer is None or self.objects_layer not in viewer.layers:
            if layer.multiscale:  # a slide: accepted objects become outlines (level-0 pixels), never a slide-sized mask
                self.objects_layer = viewer.add_shapes(name=f"{layer.name} objects", edge_color="#00e676", face_color="transparent", edge_width=2,
                                                       scale=layer.scale, translate=layer.translate)
            else:
                shape = layer.data.shape[: layer.ndim]  # (H, W), or (T, H, W) for a stack: objects go to their frame
                self.objects_layer = viewer.add_labels(np.zeros(shape, np.uint32), name=f"{layer.name} objects", scale=layer.scale, translate=layer.translate, opacity=0.5)
        if self.current_layer is None or self.current_layer not in viewer.layers:
            shape = (1, 1) if layer.multiscale else layer.data.shape[layer.ndim - 2 : layer.ndim]  # a slide's is sized to each region
            self.current_layer = viewer.add_labels(np.zeros(shape, np.uint8), name=CURRENT, scale=layer.scale[-2:], translate=layer.translate[-2:], opacity=0.6)
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
        if not layer.multiscale and not self.jobs.running:
            self._submit(None)  # build the session and run what the first click needs now, off the GUI thread
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
    def _submit(self, action: Click | Box | None):
        if self.jobs.running:
            if action is not None:
                self._pending.append(action)
            return None
        layer = self.image.value
        frame = self.frame()
        mpp = layer_mpp(layer)
        region = None
        if layer.multiscale:
            if self._region is None or self.session is None or not self.session.steps:
                self._region = slide_region(layer, action, self._pack_mpp())
            region = self._region
            ds, (y0, x0, h, w), mpp = region.downsample, region.box, region.mpp
            action = _to_region(action, ds, y0, x0)
            if isinstance(action, Click) and not (0 <= action.row < h and 0 <= action.col < w):
                self._drop_last_point()
                self.jobs.report("The click is outside the slide region of the object being clicked: accept it (Enter) or drop it (n) first.", "error")
                return None
        key = (id(layer), frame, self.model.value, self.device.value, self.bf16.value, None if region is None else region.box)
        if key != self._session_key:
            self.session, self._session_key = None, key
        if region is not None:
            data = layer.data[region.level]
        else:
            data = layer.data if frame is None else layer.data[frame]
        request = ClickRequest(action, self.session, data, bool(layer.rgb), self.model.value, mpp, self.device.value, self.bf16.value,
                               None if region is None else region.box)
        return self.jobs.start(click_job, request, description="click", on_result=self._on_result, on_done=self._on_done)

    def _pack_mpp(self) -> float | None:
        try:
            return read_manifest(find_pack(self.model.value)).get("mpp")
        except MedsegError:
            return None

    def _on_result(self, outcome: tuple[ClickSession, Step | None]) -> None:
        self.session, step = outcome
        if step is None:  # prepared: nothing clicked yet
            self.jobs.report("ready: click on an object (Shift/Ctrl/right click: outside it)")
            return
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
        if self.current_layer is None:
            return
        mask = self.session.mask if self.session is not None else None
        if mask is None:
            self.current_layer.data = np.zeros(self.current_layer.data.shape, np.uint8)
            return
        if self._region is not None:  # a slide region: place the layer over it
            layer, region = self.image.value, self._region
            self.current_layer.scale = tuple(np.asarray(layer.scale[-2:]) * region.downsample)
            self.current_layer.translate = tuple(np.asarray(layer.translate[-2:]) + np.asarray(region.box[:2]) * region.downsample * np.asarray(layer.scale[-2:]))
        self.current_layer.data = mask.astype(np.uint8)

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
        if isinstance(self.objects_layer, Shapes):
            return self._accept_outline()
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

    def _accept_outline(self) -> int:
        """A slide's object: its outline (level-0 pixels) as a new polygon of the objects layer."""
        from medseg.measure.objects import mask_polygons

        region = self._region
        y0, x0 = region.box[:2]
        polygons = mask_polygons(self.session.mask, offset=(y0, x0), scale=(region.downsample, region.downsample))
        rings = [np.asarray([(y, x) for x, y in poly[0]]) for poly in polygons]
        self.objects_layer.add_polygons(rings)
        label = len(self.objects_layer.data)
        self.next_object()
        self.jobs.report(f"object {label} accepted as an outline on the slide; click on the next object")
        return label

    def next_object(self) -> None:
        """Start the next object: clear the clicks, the box and the current object."""
        self._region = None
        if self.session is not None:
            self.session.reset()
        self._pending.clear()
        if self.clicks_layer is not None:
            self.clicks_layer.data = np.zeros((0, 2))
        if self.box_layer is not None and len(self.box_layer.data):
            with self.box_layer.events.data.blocker():
                self.box_layer.data = []
        self._show_current()


@dataclass(frozen=True)
class SlideRegion:
    """Where a slide's object is clicked: a region of one pyramid level, read once per object."""

    level: int
    downsample: float  # level-0 pixels per pixel of this level
    box: tuple[int, int, int, int]  # (y0, x0, h, w) in this level's pixels
    mpp: float | None  # this level's µm per pixel


def slide_region(layer: Image, action: Click | Box, pack_mpp: float | None) -> SlideRegion:
    """The region around a first click (or box), at the pyramid level nearest the pack's µm/px (not
    coarser), wide enough for two of the fallback's windows."""
    from medseg.interactive.session import WINDOW

    levels = layer.data
    mpp0 = layer_mpp(layer)
    downs = [levels[0].shape[0] / lv.shape[0] for lv in levels]
    level = 0
    if mpp0 and pack_mpp:
        level = max((k for k, d in enumerate(downs) if mpp0 * d <= pack_mpp * 1.05), key=lambda k: downs[k], default=0)
    ds = downs[level]
    mpp = mpp0 * ds if mpp0 else None
    side = int(round(2 * WINDOW * (pack_mpp / mpp if mpp and pack_mpp else 1.0)))
    h, w = levels[level].shape[:2]
    if isinstance(action, Box):
        cy, cx = (action.y0 + action.y1) / 2 / ds, (action.x0 + action.x1) / 2 / ds
        side = max(side, int((action.y1 - action.y0) / ds) + 2, int((action.x1 - action.x0) / ds) + 2)
    else:
        cy, cx = action.y / ds, action.x / ds
    sh, sw = min(side, h), min(side, w)
    y0 = int(min(max(cy - sh / 2, 0), h - sh))
    x0 = int(min(max(cx - sw / 2, 0), w - sw))
    return SlideRegion(level, ds, (y0, x0, sh, sw), mpp)


def _to_region(action: Click | Box, ds: float, y0: int, x0: int) -> Click | Box:
    """Level-0 image pixels -> pixels of a region of a pyramid level."""
    if isinstance(action, Click):
        return Click(action.x / ds - x0, action.y / ds - y0, action.positive)
    return Box(int(action.x0 / ds) - x0, int(action.y0 / ds) - y0, int(np.ceil(action.x1 / ds)) - x0, int(np.ceil(action.y1 / ds)) - y0)


def _rgba(colour: str) -> np.ndarray:
    from napari.utils.colormaps.standardize_color import transform_color

    return transform_color(colour)[0]


__all__ = ["ClickRequest", "ClickWidget", "click_job"]
