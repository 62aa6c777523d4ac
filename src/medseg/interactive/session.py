"""One object, clicked on one 2-D image: the click session and its two engines.

- With an **interactive pack** (manifest ``"interactive": true``), every click runs the click-guided
  network on a window around the object (image + positive/negative click disks + previous mask, at
  the pack's pixel size) and the new mask replaces the old one inside that window. When the pack's
  manifest asks for it (``"seed_first_click": true``, set where it helped on validation) and the
  automatic pack it was trained from (``"automatic_pack"``) is installed, the first click starts from
  the automatic pack's object under it (the fallback below), which the click-guided network then
  refines as its previous mask (``seed=False`` turns this off).
- With an **automatic pack** (the fallback), a positive click runs the pack on a window around the
  click with the same :class:`~medseg.engine.Predictor` users run, and adds the connected object under
  the click (of the class under the click), or, when the pack sees no object there but the object
  exists, grows the object towards the click (a band along its edge as thick as the click is far); a
  negative click removes the connected region of the current object it lands in (when that region
  also holds positive clicks, only the part along the edge, on the negative click's side of a marker
  watershed on the pack's doubt and the image's edges); what negative clicks removed stays removed
  unless a positive click lands in it; a drag box keeps the largest object the pack finds inside that rectangle
  (the network sees the box with up to one training tile of context around it). Window
  predictions are cached, so further clicks in the same window cost no network run.

Either way the object is recomputed from the image and the clicks in order (:func:`segment_clicks`),
which is what the ``medseg click`` command does; the session keeps every step so undo is instant.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from scipy import ndimage

from medseg.engine.devices import resolve_device
from medseg.engine.predictor import PredictConfig, Predictor, forward_scores
from medseg.errors import InputError, UsageError
from medseg.interactive.clicks import DISKS, Box, Click, check_clicks, check_image, component_at, encode
from medseg.io.images import ImageData, describe_array
from medseg.normalise import adapt_channels
from medseg.resample import resample_image, resample_labels, scale_factor, target_shape
from medseg.train.packs import Pack

WINDOW = 512  # side of the fallback's window around a click, in the pack's pixels
MARGIN = 0.4  # the interactive window covers the object's box plus this share on every side
COMPACTNESS = 0.01  # negative-click split: landscape height (doubt 0..1 + edges) traded against distance in pixels
EDGE_WEIGHT = 0.5  # negative-click split: weight of the image's edges (0..1) beside the pack's doubt (0..1)
_EIGHT = np.ones((3, 3), bool)


@dataclass
class Step:
    """The object after one click (or box): its mask and what happened."""

    mask: np.ndarray  # bool (H, W)
    click: Click | Box | None
    note: str = ""
    seconds: float = 0.0  # wall-clock
    cpu_seconds: float = 0.0  # CPU time of this process (all its threads)
    ran_network: bool = False
    removed: np.ndarray | None = None  # fallback: pixels negative clicks took out (kept out unless clicked again)


@dataclass
class Window:
    """A rectangle of the image, ``[y0, y1) x [x0, x1)``, and the zoom to the pack's pixel size."""

    y0: int
    y1: int
    x0: int
    x1: int
    factor: float = 1.0

    @property
    def slices(self) -> tuple[slice, slice]:
        return slice(self.y0, self.y1), slice(self.x0, self.x1)

    @property
    def shape(self) -> tuple[int, int]:
        return self.y1 - self.y0, self.x1 - self.x0

    def touches_inner_edge(self, mask: np.ndarray, image_shape: tuple[int, int]) -> bool:
        """Whether ``mask`` (window-sized) reaches a window edge that is not the image's edge."""
        h, w = image_shape
        return bool(
            (self.y0 > 0 and mask[0].any()) or (self.y1 < h and mask[-1].any()) or (self.x0 > 0 and mask[:, 0].any()) or (self.x1 < w and mask[:, -1].any())
        )


def window_around(cy: float, cx: float, side_h: int, side_w: int, shape: tuple[int, int], factor: float) -> Window:
    """A window of about ``side`` image pixels centred on ``(cy, cx)``, shifted to lie inside the image."""
    h, w = shape
    side_h, side_w = min(max(1, side_h), h), min(max(1, side_w), w)
    y0 = int(round(min(max(cy - side_h / 2, 0), h - side_h)))
    x0 = int(round(min(max(cx - side_w / 2, 0), w - side_w)))
    return Window(y0, y0 + side_h, x0, x0 + side_w, factor)


def cpu_precision(device: torch.device, bf16: bool):
    """bf16 autocast on the CPU when asked (about twice as fast; the packs were trained with it), else nothing."""
    if bf16 and device.type == "cpu":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _prepare(image: np.ndarray | ImageData, rgb: bool | None) -> ImageData:
    data = image if isinstance(image, ImageData) else describe_array(np.asarray(image), rgb=rgb)
    if data.is_stack:
        raise InputError(f"'{data.name}' is a stack of frames: clicks work on one 2-D image; choose a frame first.")
    check_image(data.array, f"'{data.name}'")
    return data


# --------------------------------------------------------------------------- engines
class FallbackEngine:
    """Clicks with an automatic pack: the connected object under the click."""

    def __init__(self, pack: Pack, data: ImageData, mpp: float | None, device: str = "cpu", bf16: bool = False) -> None:
        self.pack, self.data = pack, data
        self.image_mpp = mpp if mpp is not None else data.metadata.get("mpp")
        self.factor = scale_factor(self.image_mpp, pack.mpp)  # pack pixels per image pixel
        self.device = device
        self.bf16 = bf16
        self._cache: dict[tuple[int, int, int, int], tuple[np.ndarray, np.ndarray]] = {}
        self._edges: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.data.array.shape[:2]

    def predict(self, win: Window) -> tuple[np.ndarray, np.ndarray, bool]:
        """(labels as class indices, probabilities (C, h, w), whether the network ran) of the pack on ``win``."""
        key = (win.y0, win.y1, win.x0, win.x1)
        if key in self._cache:
            return (*self._cache[key], False)
        crop = self.data.array[win.slices]
        if crop.min() == crop.max():
            labels, probs = np.zeros(crop.shape[:2], np.int64), np.zeros((len(self.pack.classes),) + crop.shape[:2], np.float32)
            probs[0] = 1.0
        else:
            side = max(target_shape(crop.shape, self.factor))
            cfg = PredictConfig(tile=max(16, side), overlap=0.0, batch_size=1, probabilities=True, probability_dtype="float32", device=self.device)
            predictor = Predictor(self.pack, cfg)
            with cpu_precision(predictor.device, self.bf16):
                pred = predictor.predict(crop, rgb=self.data.rgb, mpp=self.image_mpp)
            probs = pred.probabilities
            labels = _class_argmax(probs)
        self._cache[key] = (labels, probs)
        return labels, probs, True

    def _window_for(self, cy: float, cx: float, side_image: tuple[int, int]) -> Window:
        return window_around(cy, cx, side_image[0], side_image[1], self.shape, self.factor)

    def prepare(self) -> bool:
        """Predict ahead the one window every click will use when the whole image fits in it (nothing
        otherwise), so that the first click costs no network run; True when the network ran."""
        side = int(round(WINDOW / self.factor))
        h, w = self.shape
        if side < h or side < w:
            return False
        return self.predict(self._window_for(h / 2, w / 2, (side, side)))[2]

    def object_at(self, click: Click) -> tuple[np.ndarray, str, bool, bool]:
        """Full-size mask of the connected object under a positive click (empty with a note if none),
        the note, whether the network ran, and whether the pack itself labels the click as an object."""
        side = int(round(WINDOW / self.factor))
        win = self._window_for(click.y, click.x, (side, side))
        ran = False
        for _ in range(3):
            labels, probs, did = self.predict(win)
            ran |= did
            r, c = click.row - win.y0, click.col - win.x0
            cls = int(labels[r, c])
            direct = cls != 0
            if cls == 0:
                if probs.shape[0] < 2:
                    return np.zeros(self.shape, bool), "the model sees no object under the click", ran, False
                cls = int(np.argmax(probs[1:, r, c])) + 1
                p = float(probs[cls, r, c])
                if p < 0.05:
                    name = self.pack.classes[cls].name if cls < len(self.pack.classes) else "object"
                    return np.zeros(self.shape, bool), f"the model sees no object under the click (at most {p:.2f} {name}); try a drag box or more positive clicks", ran, False
                region = probs[cls] >= p / 2
            else:
                region = labels == cls
            obj = component_at(region, r, c)
            grow = win.touches_inner_edge(obj, self.shape) and win.shape != self.shape
            if not grow:
                break
            rows, cols = np.nonzero(obj)
            cy, cx = win.y0 + (rows.min() + rows.max()) / 2, win.x0 + (cols.min() + cols.max()) / 2
            win = self._window_for(cy, cx, (2 * win.shape[0], 2 * win.shape[1]))
        out = np.zeros(self.shape, bool)
        out[win.slices] = obj
        return out, f"{self.pack.classes[cls].name}", ran, direct

    def step(self, mask: np.ndarray, clicks: Sequence[Click], removed: np.ndarray | None = None) -> Step:
        """Apply the last of ``clicks`` to ``mask``; ``removed`` holds what earlier negative clicks took out."""
        click = clicks[-1]
        removed = np.zeros(self.shape, bool) if removed is None else removed
        if click.positive:
            if mask[click.row, click.col]:
                return Step(mask.copy(), click, "the click is inside the current object already", removed=removed)
            obj, note, ran, direct = self.object_at(click)
            if mask.any() and not direct:  # a part the pack missed, next to the object: grow the object there
                obj, note = self.grow_towards(mask, click), "grew the object towards the click"
            elif removed[click.row, click.col]:  # taken out before, wanted back: only the part under this click
                obj = obj & component_at(removed, click.row, click.col)
            else:
                obj = obj & ~removed
            obj[click.row, click.col] = bool(obj.any())
            return Step(mask | obj, click, note, ran_network=ran, removed=removed & ~obj)
        if not mask[click.row, click.col]:
            return Step(mask.copy(), click, "the negative click is outside the current object: nothing to remove", removed=removed)
        region = component_at(mask, click.row, click.col)
        kept = [c for c in clicks[:-1] if c.positive and region[c.row, c.col]]
        if kept:  # the region also holds positive clicks: remove only the border part on the negative click's side
            region = self.split_off(region, kept, [c for c in clicks if not c.positive and region[c.row, c.col]])
            region &= _near_edge(mask, click, outside=False)
        return Step(mask & ~region, click, "removed the region under the negative click", removed=removed | region)

    def grow_towards(self, mask: np.ndarray, click: Click) -> np.ndarray:
        """The band between the object and a positive click outside it, as thick as the click is far."""
        band = _near_edge(mask, click, outside=True)
        return component_at(band, click.row, click.col)

    def split_off(self, region: np.ndarray, positives: Sequence[Click], negatives: Sequence[Click]) -> np.ndarray:
        """The part of ``region`` that a marker watershed gives to the negative clicks.

        The landscape is the pack's doubt about the object's class (1 - its probability) plus the
        image's edges: the positive clicks claim what the pack is sure of, the negative clicks the
        less certain part around them, split along edges where the doubt is alike.
        """
        from skimage.filters import sobel
        from skimage.segmentation import watershed

        rows, cols = np.nonzero(region)
        y0, y1, x0, x1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
        if self._edges is None:
            grey = self.data.array.astype(np.float32)
            grey = grey.mean(axis=-1) if self.data.rgb else grey
            edges = sobel(ndimage.gaussian_filter(grey, 1.0))
            self._edges = edges / max(float(edges.max()), 1e-6)
        doubt = np.full((y1 - y0, x1 - x0), 0.5, np.float32)
        side = int(round(WINDOW / self.factor))
        neg = negatives[-1]
        win = self._window_for(neg.y, neg.x, (side, side))
        labels, probs, _ = self.predict(win)
        inside = [c for c in positives if win.y0 <= c.row < win.y1 and win.x0 <= c.col < win.x1]
        cls = int(labels[inside[0].row - win.y0, inside[0].col - win.x0]) if inside else 0
        if cls == 0:
            cls = int(np.argmax(probs[1:, neg.row - win.y0, neg.col - win.x0])) + 1 if probs.shape[0] > 1 else 0
        oy0, oy1, ox0, ox1 = max(y0, win.y0), min(y1, win.y1), max(x0, win.x0), min(x1, win.x1)
        if cls and oy0 < oy1 and ox0 < ox1:
            doubt[oy0 - y0 : oy1 - y0, ox0 - x0 : ox1 - x0] = 1.0 - probs[cls, oy0 - win.y0 : oy1 - win.y0, ox0 - win.x0 : ox1 - win.x0]
        markers = np.zeros((y1 - y0, x1 - x0), np.int32)
        for c in positives:
            markers[c.row - y0, c.col - x0] = 1
        for c in negatives:
            markers[c.row - y0, c.col - x0] = 2
        landscape = doubt + EDGE_WEIGHT * self._edges[y0:y1, x0:x1]
        # compact: on flat, noisy insides the split follows distance (plain flooding lets one seed leak everywhere)
        basins = watershed(landscape, markers, mask=region[y0:y1, x0:x1], compactness=COMPACTNESS)
        out = np.zeros(region.shape, bool)
        out[y0:y1, x0:x1] = basins == 2
        return out

    def box(self, box: Box) -> Step:
        """The largest object of the box's main class, inside the box. The network sees the box with
        context around it up to one training tile (a tight box alone cuts the object's surroundings)."""
        least = int(round(self.pack.tile / self.factor))
        win = window_around((box.y0 + box.y1) / 2, (box.x0 + box.x1) / 2, max(least, box.y1 - box.y0), max(least, box.x1 - box.x0), self.shape, self.factor)
        labels, _, ran = self.predict(win)
        labels = labels[box.y0 - win.y0 : box.y1 - win.y0, box.x0 - win.x0 : box.x1 - win.x0]
        fg = labels[labels > 0]
        out = np.zeros(self.shape, bool)
        if fg.size == 0:
            return Step(out, box, "the model finds no object in the box; draw a larger box or click on the object", ran_network=ran)
        cls = int(np.bincount(fg).argmax())
        comp, n = ndimage.label(labels == cls, structure=_EIGHT)
        largest = int(np.argmax(np.bincount(comp.ravel())[1:])) + 1
        out[box.y0 : box.y1, box.x0 : box.x1] = comp == largest
        return Step(out, box, f"{self.pack.classes[cls].name} in the box", ran_network=ran)


class GuidedEngine:
    """Clicks with an interactive pack: the click-guided network on a window around the object.

    With ``seed`` (an automatic pack), a first positive click starts from the automatic pack's object
    under it (:class:`FallbackEngine`), given to the network as the previous mask.
    """

    def __init__(self, pack: Pack, data: ImageData, mpp: float | None, device: str = "cpu", bf16: bool = False, seed: Pack | None = None) -> None:
        if not pack.interactive:
            raise UsageError(f"Pack '{pack.id}' is not interactive: use the fallback for automatic packs.")
        self.pack, self.data = pack, data
        self.encoding = pack.manifest.get("click_encoding", DISKS)
        if self.encoding.get("kind") != "disks":
            raise UsageError(f"Pack '{pack.id}' uses click encoding '{self.encoding.get('kind')}', which this version cannot build: update napari-medseg.")
        self.radius = float(self.encoding.get("radius", DISKS["radius"]))
        self.image_mpp = mpp if mpp is not None else data.metadata.get("mpp")
        self.factor = scale_factor(self.image_mpp, pack.mpp)
        self.device = resolve_device(device)
        self.bf16 = bf16
        self.model = pack.model.to(self.device).eval()
        self.channels = adapt_channels(data.array, data.rgb, pack.in_channels, f"'{data.name}'")
        self.stats = pack.normaliser.frame_stats(self.channels)
        self.box_limit: Box | None = None
        self.seed = FallbackEngine(seed, data, mpp, device, bf16) if seed is not None else None

    @property
    def shape(self) -> tuple[int, int]:
        return self.data.array.shape[:2]

    def prepare(self) -> bool:
        """Run ahead what the first click needs and can know before it: the automatic pack's window (see
        :meth:`FallbackEngine.prepare`) when the first click is seeded; True when a network ran."""
        return self.seed.prepare() if self.seed is not None else False

    def window(self, mask: np.ndarray, clicks: Sequence[Click]) -> Window:
        """A window over the object (its mask and clicks) with a margin, at least one training crop wide."""
        rows = [c.row for c in clicks if c.positive] or [c.row for c in clicks]
        cols = [c.col for c in clicks if c.positive] or [c.col for c in clicks]
        if mask.any():
            r, c = np.nonzero(mask)
            rows += [int(r.min()), int(r.max())]
            cols += [int(c.min()), int(c.max())]
        if self.box_limit is not None:
            b = self.box_limit
            rows += [b.y0, b.y1 - 1]
            cols += [b.x0, b.x1 - 1]
        least = int(round(self.pack.tile / self.factor))
        span_h, span_w = max(rows) - min(rows) + 1, max(cols) - min(cols) + 1
        side_h = max(least, int(round(span_h * (1 + 2 * MARGIN))))
        side_w = max(least, int(round(span_w * (1 + 2 * MARGIN))))
        return window_around((min(rows) + max(rows)) / 2, (min(cols) + max(cols)) / 2, side_h, side_w, self.shape, self.factor)

    def probability(self, win: Window, clicks: Sequence[Click], previous: np.ndarray) -> np.ndarray:
        """Object probability on the window (window grid) given the clicks and the previous mask."""
        crop = self.channels[win.slices]
        shape = target_shape(crop.shape, self.factor)
        if self.factor != 1.0:
            crop = resample_image(crop, shape)
        prev = resample_labels(previous[win.slices].astype(np.uint8), shape)
        guide = encode([c.scaled(self.factor, win.x0, win.y0) for c in clicks], prev, shape, self.radius)
        x = np.concatenate([self.pack.normaliser.apply(crop, self.stats), guide])[None]
        with cpu_precision(self.device, self.bf16):
            scores = forward_scores(self.model, torch.from_numpy(x), self.device, self.pack.activation)[0]
        prob = scores[0] if self.pack.activation == "sigmoid" else scores[1]
        prob = prob.cpu().numpy()
        return resample_image(prob, win.shape) if self.factor != 1.0 else prob

    def step(self, mask: np.ndarray, clicks: Sequence[Click], removed: np.ndarray | None = None) -> Step:
        seeded = ""
        if self.seed is not None and len(clicks) == 1 and clicks[0].positive and not mask.any() and self.box_limit is None:
            mask = self.seed.step(mask, clicks).mask  # the automatic pack's object: the network's previous mask
            seeded = f"started from {self.seed.pack.id}'s object under the click" if mask.any() else ""
        win = self.window(mask, clicks)
        pred = self.probability(win, clicks, mask) > 0.5
        pred = self._keep_clicked(pred, [c for c in clicks if win.y0 <= c.row < win.y1 and win.x0 <= c.col < win.x1], win)
        out = mask.copy()
        out[win.slices] = pred
        if self.box_limit is not None:
            out &= _box_mask(self.box_limit, self.shape)
        note = seeded if out.any() else "the network sees no object at the clicks; click closer to the object's centre or draw a box"
        return Step(out, clicks[-1], note, ran_network=True)

    @staticmethod
    def _keep_clicked(pred: np.ndarray, clicks: Sequence[Click], win: Window) -> np.ndarray:
        """Only the connected parts holding a positive click (one object, no other); none lose a click's pixel."""
        labels, n = ndimage.label(pred, structure=_EIGHT)
        keep = {int(labels[c.row - win.y0, c.col - win.x0]) for c in clicks if c.positive} - {0}
        if not keep:  # the network sees nothing at the clicks: no object rather than another one
            return np.zeros_like(pred)
        out = np.isin(labels, sorted(keep))
        for c in clicks:
            out[c.row - win.y0, c.col - win.x0] = c.positive
        return out

    def box(self, box: Box) -> Step:
        self.box_limit = box
        centre = Click((box.x0 + box.x1 - 1) / 2, (box.y0 + box.y1 - 1) / 2, True)
        step = self.step(np.zeros(self.shape, bool), [centre])
        step.click = box
        return step


def seed_pack_of(pack: Pack) -> Pack | None:
    """The automatic pack that answers an interactive pack's first click: the one its manifest names
    (``"automatic_pack"``) when the manifest asks for seeding (``"seed_first_click": true``) and that
    pack is installed; else ``None``."""
    from medseg.errors import MedsegError
    from medseg.train.packs import resolve

    name = pack.manifest.get("automatic_pack")
    if not name or not pack.manifest.get("seed_first_click"):
        return None
    try:
        auto = resolve(name)
    except MedsegError:
        return None
    return None if auto.interactive else auto


def _class_argmax(probs: np.ndarray) -> np.ndarray:
    """``probs.argmax(axis=0)`` for (C, H, W) scores (first maximum on ties) in C passes over whole
    planes: about twice as fast as numpy's reduction over a leading axis, on every fallback click."""
    best = probs[0].copy()
    labels = np.zeros(probs.shape[1:], np.int64)
    for c in range(1, probs.shape[0]):
        more = probs[c] > best
        labels[more] = c
        np.maximum(best, probs[c], out=best)
    return labels


def _near_edge(mask: np.ndarray, click: Click, outside: bool) -> np.ndarray:
    """Pixels on one side of the object's edge (outside or inside it) no deeper than 1.5 x the click's
    depth, within 4 x that depth of the click: where a corrective click says the edge is wrong."""
    side = ~mask if outside else mask
    r = 6
    for _ in range(2):  # the click's depth, measured in a crop that must hold the other side
        y0, y1 = max(0, click.row - 8 * r), min(mask.shape[0], click.row + 8 * r + 1)
        x0, x1 = max(0, click.col - 8 * r), min(mask.shape[1], click.col + 8 * r + 1)
        depth = ndimage.distance_transform_edt(side[y0:y1, x0:x1])
        d = float(depth[click.row - y0, click.col - x0])
        if d < 7 * r:
            break
        r = int(d)
    yy, xx = np.ogrid[y0:y1, x0:x1]
    near = side[y0:y1, x0:x1] & (depth <= 1.5 * d + 1) & ((yy - click.row) ** 2 + (xx - click.col) ** 2 <= (4 * d + 2) ** 2)
    out = np.zeros(mask.shape, bool)
    out[y0:y1, x0:x1] = near
    return out


def _box_mask(box: Box, shape: tuple[int, int]) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[box.y0 : box.y1, box.x0 : box.x1] = True
    return m


# --------------------------------------------------------------------------- the session
@dataclass
class ClickSession:
    """Clicks on one object of one 2-D image; ``mask`` is the current object (bool, image H x W).

    ``add`` applies a click, ``set_box`` starts the object from a drag box, ``undo`` takes back the
    last click (or the box), ``reset`` starts the next object. Clicks outside the image and empty
    images are refused with one sentence.
    """

    image: np.ndarray | ImageData
    pack: Pack
    mpp: float | None = None
    rgb: bool | None = None
    device: str = "cpu"
    bf16: bool = False  # bf16 autocast on the CPU: faster clicks
    seed: bool = True  # interactive pack: the first click starts from its automatic pack's object (when its manifest asks and it is installed)
    steps: list[Step] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.data = _prepare(self.image, self.rgb)
        if self.pack.interactive:
            seed = seed_pack_of(self.pack) if self.seed else None
            self.engine: GuidedEngine | FallbackEngine = GuidedEngine(self.pack, self.data, self.mpp, self.device, self.bf16, seed)
        else:
            self.engine = FallbackEngine(self.pack, self.data, self.mpp, self.device, self.bf16)

    @property
    def shape(self) -> tuple[int, int]:
        return self.data.array.shape[:2]

    @property
    def mask(self) -> np.ndarray:
        return self.steps[-1].mask if self.steps else np.zeros(self.shape, bool)

    @property
    def clicks(self) -> list[Click]:
        return [s.click for s in self.steps if isinstance(s.click, Click)]

    @property
    def box(self) -> Box | None:
        return next((s.click for s in self.steps if isinstance(s.click, Box)), None)

    @property
    def interactive(self) -> bool:
        return isinstance(self.engine, GuidedEngine)

    def prepare(self) -> bool:
        """Do ahead, before any click, the work the first click would otherwise wait for (the automatic
        pack's prediction of an image that fits one window); True when a network ran. Optional: a GUI
        calls it off its thread when clicking starts."""
        return self.engine.prepare()

    def add(self, click: Click) -> Step:
        check_clicks([click], self.shape)
        t, cpu = time.perf_counter(), time.process_time()
        step = self.engine.step(self.mask, self.clicks + [click], self.steps[-1].removed if self.steps else None)
        step.seconds, step.cpu_seconds = time.perf_counter() - t, time.process_time() - cpu
        self.steps.append(step)
        return step

    def set_box(self, box: Box) -> Step:
        h, w = self.shape
        box = Box(max(0, box.x0), max(0, box.y0), min(w, box.x1), min(h, box.y1))
        if box.x1 - box.x0 < 2 or box.y1 - box.y0 < 2:
            raise InputError("The box is outside the image or thinner than 2 pixels: drag a box around the object on the image.")
        self.reset()
        t, cpu = time.perf_counter(), time.process_time()
        step = self.engine.box(box)
        step.seconds, step.cpu_seconds = time.perf_counter() - t, time.process_time() - cpu
        self.steps.append(step)
        return step

    def undo(self) -> bool:
        """Take back the last click or box; False when there is nothing to take back."""
        if not self.steps:
            return False
        last = self.steps.pop()
        if isinstance(last.click, Box) and isinstance(self.engine, GuidedEngine):
            self.engine.box_limit = None
        return True

    def reset(self) -> None:
        """Forget the clicks and the box (the cached window predictions stay: same image)."""
        self.steps.clear()
        if isinstance(self.engine, GuidedEngine):
            self.engine.box_limit = None


def segment_clicks(
    image: np.ndarray | ImageData,
    pack: Pack,
    clicks: Sequence[Click],
    box: Box | None = None,
    mpp: float | None = None,
    rgb: bool | None = None,
    device: str = "cpu",
    bf16: bool = False,
    seed: bool = True,
) -> np.ndarray:
    """The object from an image and all its clicks in order (and an optional box first): uint8 0/1, H x W."""
    session = ClickSession(image, pack, mpp=mpp, rgb=rgb, device=device, bf16=bf16, seed=seed)
    check_clicks(clicks, session.shape)
    if box is not None:
        session.set_box(box)
    for click in clicks:
        session.add(click)
    return session.mask.astype(np.uint8)


__all__ = ["ClickSession", "FallbackEngine", "GuidedEngine", "seed_pack_of", "MARGIN", "Step", "WINDOW", "Window", "segment_clicks", "window_around"]
