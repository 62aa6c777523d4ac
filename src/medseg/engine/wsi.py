"""Whole-slide inference that streams class labels into a chunked zarr pyramid on disk.

The run picks the pyramid level whose µm/px is closest to the pack's and, when that level is more
than 2 % off the pack's µm/px (a 0.5 µm/px slide under a 1 µm/px pack), resamples every tile it
reads to the pack's µm/px, so the network always sees tissue at the scale it was trained on. It lays
the Predictor's tile grid over that grid (same starts, same blending weights, so a level small
enough for both gives the Predictor's labels exactly), sends only tiles that touch tissue to the
model, and assembles them either by weighted probability blending or by the KPIs baseline vote (spec §10.3 steps 2-3: windows on the
organisers' grid, a pixel is foreground when at least two windows say so).

Memory does not grow with the slide: the level is processed in vertical strips (a few thousand
pixels wide, aligned to output chunks) and, inside a strip, row by row through the Predictor's band
blender, so only one band of scores of one strip is held; tiles that straddle a strip border are
predicted once per strip. A reader thread reads and normalises tiles ahead of the model and a
writer thread writes finished chunk rows, so reading, blending and writing overlap with compute.

Output (``OUT.zarr``, zarr v3):

- ``labels/0`` … ``labels/K``: uint8 class values; level k is level 0 subsampled by 2**k (nearest);
  chunks ``chunk x chunk``; level 0 is the inference grid (the chosen level, resampled to the pack's
  µm/px where it differs);
- ``confidence``: uint8, 255 x the blended probability of the chosen class (vote mode: the share of
  windows that agree);
- ``tissue``: the tissue mask used (uint8 on its overview grid);
- ``done``: one flag per level-0 chunk, set after the chunk (and its pyramid pixels) was written;
- attributes ``medseg`` (run parameters, slide geometry, pixel size, classes, ``complete``) and
  ``multiscales`` (OME-NGFF style scales in µm).

A run into an existing output with the same parameters resumes: finished chunks are kept and only
tiles that touch an unfinished chunk are predicted again, so a cancelled and restarted run gives the
same arrays as an uninterrupted one.
"""

from __future__ import annotations

import math
import os
import queue
import shutil
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from medseg.engine.devices import resolve_device
from medseg.engine.predictor import _BandBlender, blend_weights, channel_argmax, class_indices, forward_scores, tile_starts, tta_flips
from medseg.engine.progress import CancelToken, Job, Progress, check_cancel, run_sync
from medseg.engine.tissue import TissueMask, detect_tissue
from medseg.errors import Cancelled, InputError, UsageError
from medseg.io.slides import Slide, open_slide
from medseg.normalise import adapt_channels
from medseg.resample import resample_image
from medseg.train.packs import ClassInfo, Pack

FORMAT_VERSION = 1
ASSEMBLIES = ("blend", "vote")


@dataclass
class SlideConfig:
    """Run parameters of whole-slide inference, in one typed place."""

    tile: int | None = None  # tile side at the inference level (default: the pack's)
    overlap: float | None = None  # fraction shared by neighbouring tiles (default: the pack's)
    batch_size: int = 8
    device: str = "auto"
    assembly: str = "blend"  # "blend" (weighted probabilities) or "vote" (KPIs baseline, spec §10.3)
    blend: str = "gaussian"
    sigma_scale: float = 0.125
    threshold: float = 0.5  # single-output (sigmoid) packs
    min_votes: int = 2  # vote assembly: foreground where at least this many windows say so
    tta: bool = False  # average over the flips the pack was trained with (engine.predictor.tta_flips)
    level: int | None = None  # pyramid level (default: closest to the pack's µm/px)
    mpp: float | None = None  # level-0 µm/px, overriding the slide's
    tissue: bool = True  # predict only tiles that touch tissue
    region: tuple[int, int, int, int] | None = None  # level-0 (x, y, width, height): field of view or rectangle
    chunk: int = 512  # output chunk side (a power of two)
    strip: int = 8192  # strip width at the inference level (rounded to chunks)
    prefetch: int = 3  # batches read ahead
    overwrite: bool = False  # replace an output that holds a different run

    def validate(self) -> None:
        if self.tile is not None and self.tile < 16:
            raise UsageError(f"Tile size {self.tile} is too small: use at least 16 pixels.")
        if self.overlap is not None and not 0.0 <= self.overlap < 1.0:
            raise UsageError(f"Overlap {self.overlap} must be at least 0 and below 1.")
        if self.batch_size < 1:
            raise UsageError(f"Batch size {self.batch_size} must be at least 1.")
        if self.assembly not in ASSEMBLIES:
            raise UsageError(f"Assembly '{self.assembly}' is unknown: use 'blend' or 'vote'.")
        if self.blend not in ("gaussian", "constant"):
            raise UsageError(f"Blend mode '{self.blend}' is unknown: use 'gaussian' or 'constant'.")
        if self.chunk < 16 or self.chunk & (self.chunk - 1):
            raise UsageError(f"Chunk size {self.chunk} must be a power of two of at least 16 (512 is a good default).")
        if self.min_votes < 1:
            raise UsageError(f"min_votes {self.min_votes} must be at least 1 (the KPIs baseline uses 2).")
        if self.region is not None and (len(self.region) != 4 or self.region[2] <= 0 or self.region[3] <= 0):
            raise UsageError(f"Region {self.region} must be (x, y, width, height) with a positive width and height.")


@dataclass
class SlideResult:
    """A finished (or reopened) whole-slide run."""

    path: Path
    level: int  # slide level the model ran on
    shape: tuple[int, int]  # (height, width) of labels level 0
    scale: tuple[float, float]  # slide level-0 px per output px (y, x)
    mpp: float | None  # µm per output px
    classes: list[ClassInfo]
    tiles: int = 0  # tiles predicted in this run
    tiles_grid: int = 0  # tiles in the grid (region) without tissue skipping
    tiles_tissue: int = 0  # tiles that touch tissue
    seconds: float = 0.0
    complete: bool = True
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def zoom(self) -> float:
        """Inference-grid px per px of the slide level the model read (1: the level as it is)."""
        return float(self.info.get("zoom", 1.0))

    def grid_note(self) -> str:
        """' resampled x0.5 to the pack's µm/px' when the level was resampled, else ''."""
        return f" resampled x{self.zoom:.3g} to the pack's µm/px" if self.zoom != 1.0 else ""

    @property
    def root(self):
        import zarr

        return zarr.open_group(str(self.path), mode="r")

    @property
    def labels(self):
        """Level 0 of the label pyramid (a zarr array)."""
        return self.root["labels/0"]

    def pyramid(self) -> list[Any]:
        root = self.root
        return [root[f"labels/{i}"] for i in range(int(root.attrs["medseg"]["pyramid_levels"]))]

    @property
    def confidence(self):
        return self.root["confidence"]


# --------------------------------------------------------------------------- grids
def kpis_tile_starts(length: int, tile: int, stride: int) -> list[int]:
    """The KPIs organisers' window starts (spec §10.3 step 2): ⌊(L − T)/S⌋ + 1 windows, the last moved flush.

    Unlike :func:`tile_starts` the flush window *replaces* the last regular one.
    """
    if length <= tile:
        return [0]
    n = (length - tile) // stride + 1
    starts = [i * stride for i in range(n)]
    starts[-1] = length - tile
    return starts


def _stride(n: int, overlap: float) -> int:
    return max(1, int(round(n * (1.0 - overlap))))  # as the Predictor


# --------------------------------------------------------------------------- the run
@dataclass
class _Plan:
    level: int
    height: int
    width: int
    th: int
    tw: int
    ys: list[int]
    xs: list[int]
    box: tuple[int, int, int, int]  # y0, x0, y1, x1 on the inference grid, chunk aligned
    scale: tuple[float, float]  # slide level-0 px per inference-grid px
    zoom: float = 1.0  # inference-grid px per px of the level (1: the level is used as it is)

    def read_tile(self, slide: Slide, y: int, x: int) -> np.ndarray:
        """RGB tile ``(th, tw)`` of the inference grid at (y, x): read from the level, resampled when zoomed."""
        if self.zoom == 1.0:
            return slide.read_region(self.level, y, x, self.th, self.tw)
        z = self.zoom
        sy0, sx0 = int(math.floor(y / z + 1e-6)), int(math.floor(x / z + 1e-6))
        sh, sw = max(1, int(round((y + self.th) / z)) - sy0), max(1, int(round((x + self.tw) / z)) - sx0)
        return resample_image(slide.read_region(self.level, sy0, sx0, sh, sw), (self.th, self.tw))


def segment_slide(slide: Slide | str | os.PathLike, pack: Pack, output: str | os.PathLike, config: SlideConfig | None = None) -> SlideResult:
    """Synchronous whole-slide inference (see :func:`segment_slide_iter`)."""
    return run_sync(segment_slide_iter(slide, pack, output, config))


def segment_slide_iter(
    slide: Slide | str | os.PathLike,
    pack: Pack,
    output: str | os.PathLike,
    config: SlideConfig | None = None,
    cancel: CancelToken | None = None,
) -> Job[SlideResult]:
    """Generator: yields :class:`Progress` per batch of tiles (``partial`` lists the level-0 chunk boxes
    ``(y0, x0, y1, x1)`` written since the last event) and returns the :class:`SlideResult`."""
    cfg = config or SlideConfig()
    cfg.validate()
    own = not isinstance(slide, Slide)
    if own:
        slide = open_slide(slide, mpp=cfg.mpp)
    elif cfg.mpp is not None:
        slide.mpp_xy = (float(cfg.mpp), float(cfg.mpp))
    try:
        return (yield from _run(slide, pack, Path(output), cfg, cancel))
    finally:
        if own:
            slide.close()


def _plan(slide: Slide, pack: Pack, cfg: SlideConfig) -> _Plan:
    level = slide.best_level(pack.mpp) if cfg.level is None else cfg.level
    if not 0 <= level < slide.level_count:
        raise UsageError(f"Level {level} does not exist in '{slide.path.name}': choose a level from 0 to {slide.level_count - 1}.")
    h, w = slide.levels[level].shape
    sy, sx = slide.level_scale(level)
    zoom = slide_zoom(slide.level_mpp(level), pack.mpp)
    if zoom != 1.0:
        h, w, sy, sx = max(1, int(round(h * zoom))), max(1, int(round(w * zoom))), sy / zoom, sx / zoom
    c = cfg.chunk
    if cfg.region is not None:
        rx, ry, rw, rh = cfg.region
        y0, x0 = max(int(math.floor(ry / sy)), 0), max(int(math.floor(rx / sx)), 0)
        y1, x1 = min(int(math.ceil((ry + rh) / sy)), h), min(int(math.ceil((rx + rw) / sx)), w)
        if y1 <= y0 or x1 <= x0:
            raise InputError(f"The region {cfg.region} lies outside the slide ({slide.shape[1]} x {slide.shape[0]} level-0 px): draw it over the slide.")
        box = ((y0 // c) * c, (x0 // c) * c, min(-(-y1 // c) * c, h), min(-(-x1 // c) * c, w))
    else:
        box = (0, 0, h, w)
    bh, bw = box[2] - box[0], box[3] - box[1]
    tile = cfg.tile or pack.tile
    overlap = pack.overlap if cfg.overlap is None else cfg.overlap
    th, tw = min(tile, bh), min(tile, bw)
    starts = kpis_tile_starts if cfg.assembly == "vote" else tile_starts
    ys = [box[0] + s for s in starts(bh, th, _stride(th, overlap))]
    xs = [box[1] + s for s in starts(bw, tw, _stride(tw, overlap))]
    return _Plan(level, h, w, th, tw, ys, xs, box, (sy, sx), zoom)


ZOOM_TOLERANCE = 0.02  # a level within 2 % of the pack's µm/px is used as it is (training scale jitter is far wider)


def slide_zoom(level_mpp: float | None, pack_mpp: float | None) -> float:
    """Inference-grid px per level px that brings ``level_mpp`` to ``pack_mpp`` (1 when either is unknown
    or they agree within :data:`ZOOM_TOLERANCE`)."""
    if not level_mpp or not pack_mpp:
        return 1.0
    z = round(float(level_mpp) / float(pack_mpp), 6)  # 0.5, not 0.5000000000000001: exact source pixels for 2x, 4x
    return 1.0 if abs(z - 1.0) <= ZOOM_TOLERANCE else z


def _run_key(slide: Slide, pack: Pack, cfg: SlideConfig, plan: _Plan) -> dict[str, Any]:
    return {
        "format": FORMAT_VERSION,
        "slide": {"name": slide.path.name, "shape": list(slide.shape), "bytes": slide.path.stat().st_size},
        "level": plan.level,
        "pack": pack.id,
        "weights_sha256": pack.sha256,
        "tile": [plan.th, plan.tw],
        "grid": [plan.ys[:3], plan.xs[:3], len(plan.ys), len(plan.xs)],
        "box": list(plan.box),
        **({"zoom": plan.zoom} if plan.zoom != 1.0 else {}),
        "assembly": cfg.assembly,
        "blend": cfg.blend,
        "sigma_scale": cfg.sigma_scale,
        "threshold": cfg.threshold,
        "min_votes": cfg.min_votes,
        "tta": cfg.tta,
        "tissue": cfg.tissue,
        "chunk": cfg.chunk,
    }


def _pyramid_levels(h: int, w: int, chunk: int) -> int:
    n = 1
    while 2**n <= chunk and max(h, w) / 2**n >= 256:
        n += 1
    return n


def _open_output(path: Path, key: dict[str, Any], slide: Slide, pack: Pack, plan: _Plan, cfg: SlideConfig):
    import zarr

    c = cfg.chunk
    if path.is_dir() and not any(path.iterdir()):
        path.rmdir()  # an empty folder (e.g. made by a file dialog) is not another run
    if path.exists():
        try:
            root = zarr.open_group(str(path), mode="r+")
            old = dict(root.attrs.get("medseg", {})).get("run")
        except Exception:  # noqa: BLE001 - not a zarr group
            old = None
            root = None
        if old == key:
            return root, True
        if not cfg.overwrite:
            what = "a different run" if old else "something that is not a medseg slide result"
            raise UsageError(f"'{path}' already holds {what}: choose another output or allow overwriting (--overwrite).")
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    root = zarr.open_group(str(path), mode="w")
    levels = _pyramid_levels(plan.height, plan.width, c)
    for k in range(levels):
        f = 2**k
        root.create_array(f"labels/{k}", shape=(-(-plan.height // f), -(-plan.width // f)), chunks=(c, c), dtype="uint8", fill_value=0)
    root.create_array("confidence", shape=(plan.height, plan.width), chunks=(c, c), dtype="uint8", fill_value=0)
    nr, nc = -(-plan.height // c), -(-plan.width // c)
    root.create_array("done", shape=(nr, nc), chunks=(min(nr, 1024), min(nc, 1024)), dtype="uint8", fill_value=0)
    level_mpp = slide.level_mpp(plan.level)
    grid_mpp = None if level_mpp is None else level_mpp / plan.zoom
    sy, sx = plan.scale
    mpp_y = None if slide.mpp_xy is None else slide.mpp_xy[1] * sy
    mpp_x = None if slide.mpp_xy is None else slide.mpp_xy[0] * sx
    root.attrs["medseg"] = {
        "run": key,
        "complete": False,
        "slide_path": str(slide.path.resolve()),
        "slide_shape": list(slide.shape),
        "slide_mpp": slide.mpp,
        "level": plan.level,
        "scale": [sy, sx],
        "zoom": plan.zoom,
        "mpp": grid_mpp,
        "pack_mpp": pack.mpp,
        "classes": [c_.to_dict() for c_ in pack.classes],
        "pyramid_levels": levels,
        "chunk": c,
    }
    unit = [mpp_y or 1.0, mpp_x or 1.0]
    root.attrs["multiscales"] = [
        {
            "version": "0.5-medseg",
            "name": "labels",
            "axes": [{"name": "y", "type": "space", "unit": "micrometer" if mpp_y else None}, {"name": "x", "type": "space", "unit": "micrometer" if mpp_x else None}],
            "datasets": [{"path": f"labels/{k}", "coordinateTransformations": [{"type": "scale", "scale": [unit[0] * 2**k, unit[1] * 2**k]}]} for k in range(levels)],
        }
    ]
    return root, False


def _tissue(root, slide: Slide, cfg: SlideConfig, resumed: bool) -> TissueMask | None:
    if not cfg.tissue:
        return None
    if resumed and "tissue" in root:
        arr = root["tissue"]
        return TissueMask(np.asarray(arr[...]).astype(bool), tuple(arr.attrs["scale"]), float(arr.attrs["threshold"]))
    tm = detect_tissue(slide)
    arr = root.create_array("tissue", shape=tm.mask.shape, chunks=tm.mask.shape, dtype="uint8", fill_value=0, overwrite=True)
    arr[...] = tm.mask.astype(np.uint8)
    arr.attrs.update({"scale": list(tm.scale), "threshold": tm.threshold, "fraction": tm.fraction})
    return tm


def _norm_stats(slide: Slide, pack: Pack, tissue: TissueMask | None) -> tuple[float, float]:
    """Normaliser statistics: fixed packs need none; z-score packs get the tissue's statistics from the overview."""
    if pack.normaliser.kind != "zscore":
        return (0.0, 1.0)
    rgb, _ = slide.read_downsampled(1024)
    img = adapt_channels(rgb, True, pack.in_channels)
    if tissue is not None:
        from skimage.transform import resize

        m = resize(tissue.mask.astype(np.float32), rgb.shape[:2], order=0) > 0.5
        if m.any():
            img = img[m][:, None, :]
    return pack.normaliser.frame_stats(img)


def _run(slide: Slide, pack: Pack, out: Path, cfg: SlideConfig, cancel: CancelToken | None) -> Iterator[Progress]:
    t0 = time.perf_counter()
    yield Progress(0, 0, f"planning {slide.path.name}")
    plan = _plan(slide, pack, cfg)
    key = _run_key(slide, pack, cfg, plan)
    root, resumed = _open_output(out, key, slide, pack, plan, cfg)
    yield Progress(0, 0, "finding tissue")
    tissue = _tissue(root, slide, cfg, resumed)
    c = cfg.chunk
    done = np.asarray(root["done"][...]).astype(bool)
    sy, sx = plan.scale
    flips = tta_flips(pack) if cfg.tta else ()

    def has_tissue(y: int, x: int) -> bool:
        return tissue is None or tissue.touches(y * sy, x * sx, (y + plan.th) * sy, (x + plan.tw) * sx)

    # strips aligned to chunks
    y0, x0, y1, x1 = plan.box
    sw = max(c, (cfg.strip // c) * c)
    strips = [(a, min(a + sw, x1)) for a in range(x0, x1, sw)]
    tissue_tiles = {(y, x) for y in plan.ys for x in plan.xs if has_tissue(y, x)}

    def needed(y: int, x: int, a: int, b: int) -> bool:
        if (y, x) not in tissue_tiles:
            return False
        r0, r1 = y // c, -(-(y + plan.th) // c)
        c0, c1 = max(x, a) // c, -(-min(x + plan.tw, b) // c)
        return not done[r0:r1, c0:c1].all()

    schedule = []  # per strip: (a, b, xs, [(y, [needed x...]), ...])
    for a, b in strips:
        xs = [x for x in plan.xs if x < b and x + plan.tw > a]
        rows = [(y, [x for x in xs if needed(y, x, a, b)]) for y in plan.ys]
        schedule.append((a, b, xs, rows))
    work = [(y, x) for _, _, _, rows in schedule for y, row in rows for x in row]
    total = len(work)
    yield Progress(0, total, f"{total} tiles to predict ({len(tissue_tiles)} of {len(plan.ys) * len(plan.xs)} touch tissue)")

    device = resolve_device(cfg.device)
    model = pack.model.to(device).eval()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    stats = _norm_stats(slide, pack, tissue)
    values = [cl.value for cl in pack.classes]
    if max(values) > 255:
        raise UsageError(f"Pack '{pack.id}' has class values above 255: whole-slide output is uint8; renumber its classes.")
    lut = torch.as_tensor(np.asarray(values, np.int64), device=device)
    vote = cfg.assembly == "vote"
    n_acc = max(len(pack.classes), 2) if vote else pack.num_outputs
    weights = torch.from_numpy(blend_weights(plan.th, plan.tw, "constant" if vote else cfg.blend, cfg.sigma_scale)).to(device)

    reader = _Reader(slide, plan, pack, stats, work, cfg)
    writer = _Writer(root, c, done)
    reader.start()
    writer.start()
    pending: deque = deque()
    predicted = 0
    try:
        for a, b, xs, rows in schedule:
            bx0 = min(xs)
            band = _BandBlender(n_acc, plan.height, max(x + plan.tw for x in xs) - bx0, plan.th, weights, device)
            band.lo = plan.ys[0]
            rowbuf = _RowBuffer(writer, c, y0, y1, a, b)
            if plan.ys[0] > y0:  # rows no window reaches (KPIs grid on short axes)
                rowbuf.add(y0, np.zeros((plan.ys[0] - y0, b - a), np.uint8), np.zeros((plan.ys[0] - y0, b - a), np.uint8))
            for i, (y, row) in enumerate(rows):
                for x in row:
                    while not pending:
                        check_cancel(cancel)
                        specs, batch = reader.next()
                        scores = forward_scores(model, batch, device, pack.activation, flips)
                        pending.extend(zip(specs, scores))
                        predicted += len(specs)
                        yield Progress(predicted, total, f"{predicted}/{total} tiles", writer.take_written())
                    (ty, tx), s = pending.popleft()
                    assert (ty, tx) == (y, x)
                    if vote:
                        s = torch.nn.functional.one_hot(class_indices(s, pack.activation, cfg.threshold), n_acc).permute(2, 0, 1).float()
                    band.add(s, y, x - bx0)
                nxt = plan.ys[i + 1] if i + 1 < len(rows) else y1
                start, acc, wsum = band.finalise_raw(nxt)
                labels, conf = _assemble(acc[:, :, a - bx0 : b - bx0], wsum[:, a - bx0 : b - bx0], pack.activation, cfg, lut, vote)
                rowbuf.add(start, labels, conf)
            rowbuf.flush()
            check_cancel(cancel)
        writer.finish()
    except BaseException as exc:
        reader.stop()
        writer.finish()
        if isinstance(exc, Cancelled):
            raise Cancelled(f"Cancelled: the {int(writer.done.sum())} finished chunks are kept in '{out}'; run the same command again to resume.") from None
        raise
    finally:
        reader.stop()
    seconds = time.perf_counter() - t0
    meta = dict(root.attrs["medseg"])
    meta.update(
        complete=True,
        tiles_grid=len(plan.ys) * len(plan.xs),
        tiles_tissue=len(tissue_tiles),
        tissue_fraction=None if tissue is None else tissue.fraction,
        assembly=cfg.assembly,
        seconds_last_run=seconds,
    )
    root.attrs["medseg"] = meta
    yield Progress(total, total, "done", writer.take_written())
    result = open_result(out)
    result.tiles, result.seconds = predicted, seconds
    result.info.update(resumed=resumed, reader_wait_s=reader.wait_s, write_s=writer.write_s)
    return result


def _assemble(acc: torch.Tensor, wsum: torch.Tensor, activation: str, cfg: SlideConfig, lut: torch.Tensor, vote: bool) -> tuple[np.ndarray, np.ndarray]:
    """Class values and confidence (uint8) of finished rows; pixels no tile covered are background."""
    covered = wsum > 0
    cov = wsum.clamp_min(1e-12)
    if vote:
        fg = acc[1:].sum(0)
        idx = torch.where(fg >= cfg.min_votes, 1 + channel_argmax(acc[1:], 0), torch.zeros_like(fg, dtype=torch.long))
        conf = torch.where(idx > 0, fg, cov - fg) / cov
    else:
        probs = acc / cov
        idx = class_indices(probs, activation, cfg.threshold)
        if activation == "sigmoid":
            conf = torch.where(idx > 0, probs[0], 1.0 - probs[0])
        else:
            conf = probs.max(dim=0).values
    idx = torch.where(covered, idx, torch.zeros_like(idx))
    conf = torch.where(covered, conf, torch.zeros_like(conf))
    labels = lut[idx].to(torch.uint8).cpu().numpy()
    return labels, (conf.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


class _Reader(threading.Thread):
    """Reads and normalises tiles in schedule order, a few batches ahead of the model."""

    def __init__(self, slide: Slide, plan: _Plan, pack: Pack, stats, work: list[tuple[int, int]], cfg: SlideConfig) -> None:
        super().__init__(daemon=True, name="medseg-slide-reader")
        self.slide, self.plan, self.pack, self.stats, self.work, self.bs = slide, plan, pack, stats, work, cfg.batch_size
        self.q: queue.Queue = queue.Queue(maxsize=max(1, cfg.prefetch))
        self._halt = threading.Event()
        self.wait_s = 0.0

    def run(self) -> None:
        try:
            p = self.plan
            for i in range(0, len(self.work), self.bs):
                specs = self.work[i : i + self.bs]
                tiles = []
                for y, x in specs:
                    rgb = p.read_tile(self.slide, y, x)
                    tiles.append(self.pack.normaliser.apply(adapt_channels(rgb, True, self.pack.in_channels), self.stats))
                item = (specs, torch.from_numpy(np.stack(tiles)))
                while not self._halt.is_set():
                    try:
                        self.q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._halt.is_set():
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            self.q.put(exc)

    def next(self):
        t = time.perf_counter()
        item = self.q.get()
        self.wait_s += time.perf_counter() - t
        if isinstance(item, BaseException):
            raise item
        return item

    def stop(self) -> None:
        """Stop reading and wait for the thread, so the slide can be closed safely afterwards."""
        self._halt.set()
        while self.is_alive():
            try:
                while True:
                    self.q.get_nowait()
            except queue.Empty:
                pass
            self.join(timeout=0.05)


class _Writer(threading.Thread):
    """Writes finished chunk rows (labels, their pyramid pixels, confidence) then marks them done."""

    def __init__(self, root, chunk: int, done: np.ndarray) -> None:
        super().__init__(daemon=True, name="medseg-slide-writer")
        self.root, self.c, self.done = root, chunk, done
        self.levels = [root[f"labels/{k}"] for k in range(int(root.attrs["medseg"]["pyramid_levels"]))]
        self.conf = root["confidence"]
        self.done_arr = root["done"]
        self.q: queue.Queue = queue.Queue(maxsize=4)
        self.error: BaseException | None = None
        self._written: list[tuple[int, int, int, int]] = []
        self._lock = threading.Lock()
        self.write_s = 0.0

    def put(self, y0: int, x0: int, labels: np.ndarray, conf: np.ndarray) -> None:
        if self.error is not None:
            raise self.error
        self.q.put((y0, x0, labels, conf))

    def run(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                return
            if self.error is not None:
                continue
            try:
                t = time.perf_counter()
                self._write(*item)
                self.write_s += time.perf_counter() - t
            except BaseException as exc:  # noqa: BLE001 - re-raised in the producer
                self.error = exc

    def _write(self, y0: int, x0: int, labels: np.ndarray, conf: np.ndarray) -> None:
        c = self.c
        r = y0 // c
        h, w = labels.shape
        cols = range(x0 // c, -(-(x0 + w) // c))
        boxes = []
        for ci in cols:
            if self.done[r, ci]:
                continue
            a, b = ci * c - x0, min((ci + 1) * c, x0 + w) - x0
            lab = labels[:, a:b]
            for k, arr in enumerate(self.levels):
                f = 2**k
                arr[y0 // f : y0 // f + -(-h // f), (x0 + a) // f : (x0 + a) // f + -(-(b - a) // f)] = lab[::f, ::f]
            self.conf[y0 : y0 + h, x0 + a : x0 + b] = conf[:, a:b]
            boxes.append((y0, x0 + a, y0 + h, x0 + b))
        if boxes:
            c0, c1 = boxes[0][1] // c, -(-boxes[-1][3] // c)
            self.done[r, c0:c1] = True
            self.done_arr[r : r + 1, c0:c1] = self.done[r : r + 1, c0:c1].astype(np.uint8)
        with self._lock:
            self._written.extend(boxes)

    def take_written(self) -> list[tuple[int, int, int, int]]:
        with self._lock:
            out, self._written = self._written, []
        return out

    def finish(self) -> None:
        if self.is_alive():
            self.q.put(None)
            self.join()
        if self.error is not None:
            err, self.error = self.error, None
            raise err


class _RowBuffer:
    """Collects finished rows of one strip and hands whole chunk rows to the writer."""

    def __init__(self, writer: _Writer, chunk: int, y0: int, y1: int, a: int, b: int) -> None:
        self.writer, self.c, self.y1, self.a = writer, chunk, y1, a
        self.next_row = y0
        self.parts: list[tuple[np.ndarray, np.ndarray]] = []
        self.rows = 0

    def add(self, start: int, labels: np.ndarray, conf: np.ndarray) -> None:
        assert start == self.next_row + self.rows
        self.parts.append((labels, conf))
        self.rows += labels.shape[0]
        while self.rows and (self.rows >= self.c - (self.next_row % self.c) or self.next_row + self.rows >= self.y1):
            self._emit(min(self.c - self.next_row % self.c, self.rows))

    def _emit(self, n: int) -> None:
        lab = np.concatenate([p[0] for p in self.parts]) if len(self.parts) > 1 else self.parts[0][0]
        conf = np.concatenate([p[1] for p in self.parts]) if len(self.parts) > 1 else self.parts[0][1]
        self.writer.put(self.next_row, self.a, np.ascontiguousarray(lab[:n]), np.ascontiguousarray(conf[:n]))
        self.parts = [(lab[n:], conf[n:])] if n < lab.shape[0] else []
        self.rows -= n
        self.next_row += n

    def flush(self) -> None:
        if self.rows:
            self._emit(self.rows)


# --------------------------------------------------------------------------- reading results
def open_result(path: str | os.PathLike) -> SlideResult:
    """Reopen a whole-slide result written by :func:`segment_slide_iter`."""
    import zarr

    path = Path(path)
    try:
        root = zarr.open_group(str(path), mode="r")
        meta = dict(root.attrs["medseg"])
        shape = tuple(root["labels/0"].shape)
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"'{path}' is not a medseg slide result (a zarr folder written by 'medseg wsi'): check the path.") from exc
    classes = [ClassInfo(int(c["value"]), str(c["name"]), str(c["color"])) for c in meta["classes"]]
    return SlideResult(
        path=path,
        level=int(meta["level"]),
        shape=shape,
        scale=tuple(meta["scale"]),
        mpp=meta.get("mpp"),
        classes=classes,
        tiles_grid=int(meta.get("tiles_grid", 0)),
        tiles_tissue=int(meta.get("tiles_tissue", 0)),
        complete=bool(meta.get("complete", False)),
        info=meta,
    )


__all__ = ["SlideConfig", "SlideResult", "kpis_tile_starts", "open_result", "segment_slide", "segment_slide_iter"]
