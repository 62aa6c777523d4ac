"""Training click-guided (interactive) variants of a network: the loop of :mod:`medseg.train.loop`
with guidance channels, one object per crop and simulated clicks.

Per crop, one object (a connected component of one foreground class) is the target. The first click
is drawn inside it, far from its border; then, as in RITM (Sofiiuk et al. 2022), up to
``MAX_ITERS`` rounds run the network without gradients and add the next click at the interior point
of its largest error region, the prediction becoming the previous-mask channel. The network is the
automatic one with a widened stem (:class:`medseg.models.guided.GuidedNet`), initialised from the
automatic pack (``init_from``): image filters copied, guidance filters zero. Validation and the final
report use the number-of-clicks protocol on whole validation images with the same click session
users run. The pack's manifest says it is interactive and records its click encoding.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from medseg import models
from medseg.engine.progress import Job, Progress
from medseg.errors import UsageError
from medseg.interactive.clicks import DISKS, Click, encode, next_click, random_inside
from medseg.interactive.evaluate import click_run, objects_of, summarise_runs
from medseg.interactive.session import ClickSession
from medseg.io.atomic import atomic_write_text
from medseg.models.guided import GuidedNet, load_widened
from medseg.train.augment import NONE
from medseg.train.datasets import Case, SegmentationDataset, TrainSamples, evenly, read_case_image, read_mask
from medseg.train.loop import TrainConfig, _Trainer
from medseg.train.packs import MANIFEST, ClassInfo, Pack, load_pack

MAX_ITERS = 3  # corrective rounds without gradients before the training forward
MIN_OBJECT = 16  # pixels: smaller components are not click targets
ONE_PER_IMAGE = {"psfhs": (1, 2)}  # classes with one object per image by nature: their largest component only
VAL_CLICKS = 3  # validation score: mean IoU after this many simulated clicks
FINAL_CASES = 30  # validation images of the final click report unless final_eval_limit says otherwise


class ObjectCrops(SegmentationDataset):
    """Training crops that hold at least one object (crops without foreground are redrawn)."""

    def sample(self, i: int, rng: np.random.Generator, train: bool = True) -> tuple[np.ndarray, np.ndarray]:
        for _ in range(8):
            x, y = super().sample(i, rng, train)
            if (y > 0).sum() >= MIN_OBJECT:
                break
        return x, y


def pick_object(y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One object of a class-index crop: a random foreground class present, a random component of it."""
    present = [int(c) for c in np.unique(y) if c > 0]
    if not present:
        return np.zeros(y.shape, bool)
    cls = present[int(rng.integers(len(present)))]
    labels, n = ndimage.label(y == cls, structure=np.ones((3, 3), bool))
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    ok = [i + 1 for i in range(n) if sizes[i] >= MIN_OBJECT] or [int(np.argmax(sizes)) + 1]
    return labels == ok[int(rng.integers(len(ok)))]


def guided_batch(x: np.ndarray, clicks: Sequence[Sequence[Click]], previous: np.ndarray, radius: float) -> torch.Tensor:
    """Image batch (B, C, h, w) + guidance -> network input (B, C + 3, h, w)."""
    x = np.asarray(x, np.float32)
    b, ch, h, w = x.shape
    out = np.empty((b, ch + 3, h, w), np.float32)
    out[:, :ch] = x
    for i, (c, p) in enumerate(zip(clicks, previous)):
        encode(c, p, (h, w), radius, out=out[i, ch:])
    return torch.from_numpy(out)


class InteractiveTrainer(_Trainer):
    """The training loop for click-guided variants (see the module docstring)."""

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__(cfg)
        if cfg.interactive != DISKS["kind"]:
            raise UsageError(f"Unknown click encoding '{cfg.interactive}': use '{DISKS['kind']}'.")
        self.encoding = dict(DISKS)
        r = self.recipe
        self.dataset = ObjectCrops(self.train_cases, r.in_channels, r.num_classes, self.normaliser, self.crop, r.augment if cfg.augment else NONE, r.mpp, cache=True)
        self.samples = TrainSamples(self.dataset, cfg.seed)
        self._val_objects: dict[str, list[tuple[str, np.ndarray]]] = {}

    # ---------------------------------------------------------------- the network
    def new_model(self) -> nn.Module:
        cfg, r = self.cfg, self.recipe
        base = models.build(cfg.arch, in_channels=r.in_channels, num_classes=2, config=cfg.config, **(cfg.arch_overrides or {}))  # background, object
        return GuidedNet(base, len(self.encoding["channels"]))

    def init_weights(self, model: nn.Module, name: str) -> dict[str, Any]:
        source = load_pack(name)
        if source.interactive:
            loaded, skipped = load_widened(model, {k.removeprefix("base."): v for k, v in source.model.state_dict().items()})
        else:
            loaded, skipped = load_widened(model, source.model.state_dict())
        if not loaded:
            raise UsageError(f"Pack '{name}' ({source.architecture}/{source.config}) shares no weights with this network: start from a pack of the same architecture.")
        return {"pack": source.id, "sha256": source.sha256, "loaded_tensors": len(loaded), "skipped_tensors": len(skipped)}

    def automatic_pack(self) -> str | None:
        """The automatic pack this chain of runs started from (the first click's seed for users)."""
        if not hasattr(self, "_automatic"):
            self._automatic = None
            if self.cfg.init_from:
                source = load_pack(self.cfg.init_from)
                self._automatic = source.manifest.get("automatic_pack") if source.interactive else source.id
        return self._automatic

    def live_pack(self, model: nn.Module, pack_id: str = "validation") -> Pack:
        r = self.recipe
        classes = [ClassInfo(0, "background", "#000000"), ClassInfo(1, "object", "#ffd700")]
        manifest = {"kind": "interactive", "click_encoding": self.encoding}
        if pack_id != "validation" and self.automatic_pack():
            manifest["automatic_pack"] = self.automatic_pack()
        return Pack(pack_id, model, self.cfg.arch, self.cfg.config, r.in_channels, classes, self.normaliser, "softmax", r.mpp, self.crop, r.overlap, interactive=True, manifest=manifest)

    # ---------------------------------------------------------------- steps
    def train_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, x: Any, y: Any, scheduler=None) -> float:
        rng = np.random.default_rng([self.cfg.seed, 3, int(getattr(self, "step", 0))])
        x, y = np.asarray(x), np.asarray(y)
        targets = np.stack([pick_object(t, rng) for t in y])
        clicks: list[list[Click]] = [[c] if (c := random_inside(t, rng)) is not None else [] for t in targets]
        previous = np.zeros(targets.shape, np.float32)
        rounds = int(rng.integers(0, MAX_ITERS + 1))
        if rounds:
            model.eval()
            with torch.no_grad():
                for _ in range(rounds):
                    inp = guided_batch(x, clicks, previous, self.encoding["radius"]).to(self.device)
                    pred = (model(inp).argmax(1) == 1).cpu().numpy()
                    for b in range(len(targets)):
                        click = next_click(targets[b], pred[b])
                        if click is not None:
                            clicks[b].append(click)
                    previous = pred.astype(np.float32)
        return super().train_step(model, optimizer, guided_batch(x, clicks, previous, self.encoding["radius"]), targets.astype(np.int64), scheduler)

    # ---------------------------------------------------------------- validation
    def objects(self, case: Case) -> tuple[np.ndarray, bool, list[tuple[str, np.ndarray]]]:
        image, rgb = read_case_image(case)
        if case.id not in self._val_objects:
            mask = read_mask(case, self.recipe.num_classes)
            names = {i: n for i, n in enumerate(self.recipe.class_names)}
            self._val_objects[case.id] = objects_of(mask, names, largest_only=ONE_PER_IMAGE.get(self.recipe.name, ()))
        return image, rgb, self._val_objects[case.id]

    def click_runs(self, pack: Pack, cases: Sequence[Case], min_clicks: int, max_clicks: int):
        runs = []
        for case in cases:
            image, rgb, objects = self.objects(case)
            if not objects:
                continue
            session = ClickSession(image, pack, mpp=case.mpp, rgb=rgb, device=str(self.device), seed=False)  # the network alone
            runs += [click_run(session, obj, name, max_clicks=max_clicks, min_clicks=min_clicks) for name, obj in objects]
        return runs

    def validate(self, model: nn.Module, cases) -> float:
        runs = self.click_runs(self.live_pack(model), cases, VAL_CLICKS, VAL_CLICKS)
        model.train()
        return float(np.mean([r.iou_after(VAL_CLICKS) for r in runs])) if runs else 0.0

    def final_report(self, pack: Pack) -> Job[None]:
        """Nothing here: the click protocol runs on the written pack in :meth:`finish`."""
        return None
        yield  # a generator, like the method it replaces

    def finish(self) -> Job:
        result = yield from super().finish()
        cases = evenly(self.val_cases, self.cfg.final_eval_limit or FINAL_CASES)
        if self.cfg.final_eval:
            yield Progress(0, 1, "final validation: simulated clicks")
            pack = load_pack(result.pack_path)
            runs = self.click_runs(pack, cases, 5, 20)
            names = sorted({r.name for r in runs})
            metrics = {"split": "val", "protocol": "number of clicks (max 20, next click at the centre of the largest error region)"}
            metrics.update({n: {k: round(v, 4) for k, v in summarise_runs([r for r in runs if r.name == n]).items()} for n in names})
            manifest = json.loads((result.pack_path / MANIFEST).read_text(encoding="utf-8"))
            manifest["metrics"] = metrics
            atomic_write_text(result.pack_path / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        return result


__all__ = ["InteractiveTrainer", "ObjectCrops", "guided_batch", "pick_object"]
