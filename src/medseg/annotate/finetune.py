"""Fine-tune a pack on corrected masks: the sessions' images and final masks become a training folder,
the pack's own training loop (:mod:`medseg.train.loop`, ``init_from`` the pack) trains on it, and the new
pack version records its validation numbers next to the old ones (and the validation loss of both,
measured the same way here).

Validation is on held-out corrected sessions when they are given (``val_sessions``: tiles of the
annotator's own material that training never sees, which is what the fine-tuning is for), else on the
pack's validation split. With held-out sessions the pack's validation split is measured as well, before
and after (``reference`` in the manifest), so that what the new version forgets of the old material is
on record next to what it gained on the new.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from medseg.annotate.session import CorrectionSession, is_session
from medseg.engine.progress import CancelToken, Job, Progress, check_cancel
from medseg.errors import InputError, UsageError
from medseg.io.atomic import atomic_write_text


@dataclass
class FinetuneResult:
    pack_path: Path
    version: str
    previous: dict[str, Any]
    metrics: dict[str, Any]
    val_loss_before: float
    val_loss_after: float
    tiles: int
    steps: int
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)
    validation: str = "val split"  # what the validation numbers are measured on
    reference: dict[str, Any] | None = None  # with held-out sessions: the pack's validation split before/after


AUGMENT: dict[str, dict[str, Any] | None] = {
    "recipe": None,  # the pack's training augmentation (geometry, scale, stain/intensity, crops on objects half the time)
    "light": {"rotate_deg": 0.0, "scale": [1.0, 1.0], "foreground_crop": 0.0, "brightness": 0.0, "contrast": 0.0, "gamma": 0.0, "noise": 0.0, "saturation": 0.0, "hed": 0.0},  # flips and 90° turns only
    "none": None,
}


def session_folders(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Session folders as given, or the session folders inside the given folders."""
    found: list[Path] = []
    for p in map(Path, paths):
        if is_session(p):
            found.append(p)
        elif p.is_dir():
            inner = sorted(q for q in p.iterdir() if is_session(q))
            if not inner:
                raise InputError(f"'{p}' is not a correction session and holds none: give session folders (made by 'medseg correct').")
            found.extend(inner)
        else:
            raise InputError(f"'{p}' does not exist: give a correction session folder.")
    return found


def corrected_dataset(sessions: Sequence[str | os.PathLike], folder: str | os.PathLike, target_mpp: float | None, split: str = "train") -> tuple[Path, list[dict[str, Any]]]:
    """Write each session's image and final mask (class indices, resampled to ``target_mpp`` when the
    session knows its µm/px) as ``folder/images`` + ``folder/masks`` with a ``splits.csv`` of ``split`` rows."""
    import imageio.v3 as iio

    from medseg.resample import resample_image, resample_labels, scale_factor, target_shape

    folder = Path(folder)
    for sub in ("images", "masks"):  # written afresh: tiles of an earlier run in this folder must not be trained on
        shutil.rmtree(folder / sub, ignore_errors=True)
        (folder / sub).mkdir(parents=True)
    rows, described = [], []
    for k, path in enumerate(sessions):
        with CorrectionSession.open(path) as s:
            image = s.read_image()
            mask = (s.labels > 0).astype(np.uint8)
            counts = s.counts()
            factor = scale_factor(s.mpp, target_mpp)
            if factor != 1.0:
                shape = target_shape(image.shape, factor)
                image, mask = resample_image(image, shape), resample_labels(mask, shape)
            if image.dtype != np.uint8:
                raise InputError(f"The image of session '{path}' is {image.dtype}: fine-tuning takes 8-bit images (as the tiles a pack is trained on).")
            name = f"{k:03d}-{Path(path).name.replace('.correct', '')}"
            iio.imwrite(folder / "images" / f"{name}.png", image)
            iio.imwrite(folder / "masks" / f"{name}.png", mask)
            mpp = target_mpp if s.mpp and target_mpp else s.mpp
            rows.append({"name": name, "split": split, "group": name, "source": str(Path(path).resolve()), "mpp": "" if mpp is None else f"{mpp:g}"})
            described.append({"session": str(Path(path).resolve()), "tile": name, "shape": list(mask.shape), **{k2: counts[k2] for k2 in ("accepted", "edited", "rejected", "added", "unreviewed")}})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["name", "split", "group", "source", "mpp"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(folder / "splits.csv", buf.getvalue())
    return folder, described


def validation_loss(pack: Any, recipe: Any, cases: Sequence[Any], cancel: CancelToken | None = None) -> Job[float]:
    """The training loss (cross-entropy + soft Dice over the foreground classes) of the pack on the whole
    validation tiles at its pixel size, pooled over the split as one batch: cross-entropy averaged over
    all pixels, Dice from the summed overlaps (batch Dice, as in training), so small tiles do not swing it."""
    import torch
    import torch.nn.functional as F

    from medseg.train.datasets import SegmentationDataset

    data = SegmentationDataset(cases, pack.in_channels, recipe.num_classes, pack.normaliser, recipe.crop, target_mpp=pack.mpp, cache=False)
    model = pack.model.eval()
    ce_sum, pixels = 0.0, 0
    inter = np.zeros(recipe.num_classes - 1)
    denom = np.zeros(recipe.num_classes - 1)
    for i in range(len(data)):
        check_cancel(cancel)
        item = data.load(i)
        x = torch.from_numpy(pack.normaliser.apply(item.image, item.stats))[None]
        y = torch.from_numpy(item.mask.astype(np.int64))[None]
        with torch.inference_mode():
            logits = model(x).float()
            ce_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            pixels += y.numel()
            probs = torch.softmax(logits, dim=1)[0, 1:]
            onehot = F.one_hot(y[0], recipe.num_classes).permute(2, 0, 1)[1:].float()
            inter += (probs * onehot).sum((1, 2)).numpy()
            denom += (probs.sum((1, 2)) + onehot.sum((1, 2))).numpy()
        yield Progress(i + 1, len(data), f"{i + 1}/{len(data)} tiles")
    dice = (2 * inter + 1e-5) / (denom + 1e-5)
    return float(ce_sum / max(pixels, 1) + 1.0 - dice.mean())


def bump_version(version: str | None) -> str:
    parts = (version or "1.0.0").split(".")
    try:
        major, minor = int(parts[0]), int(parts[1]) if len(parts) > 1 else 0
    except ValueError:
        return f"{version}.1"
    return f"{major}.{minor + 1}.0"


def finetune_iter(
    pack: str | os.PathLike,
    sessions: Sequence[str | os.PathLike],
    out: str | os.PathLike | None = None,
    steps: int | None = None,
    minutes: float | None = None,
    lr: float = 1e-4,
    threads: int | None = None,
    val_limit: int | None = None,
    val_every: int | None = None,
    workdir: str | os.PathLike = "work",
    data_root: str | None = None,
    seed: int = 0,
    freeze_norm: bool = True,
    replay: bool = True,
    val_sessions: Sequence[str | os.PathLike] | None = None,
    augment: str = "light",
    crop: int | None = None,
    cancel: CancelToken | None = None,
) -> Job[FinetuneResult]:
    """Train ``pack`` on the corrected sessions and write the new pack version (see the module docstring)."""
    from medseg.engine.predictor import PredictConfig
    from medseg.train.datasets import evenly, folder_cases
    from medseg.train.evaluate import EvalOptions, evaluate_iter, headline
    from medseg.train.loop import TrainConfig, _relay, train_iter
    from medseg.train.packs import load_pack, resolve
    from medseg.train.recipes import RECIPES

    if steps is None and minutes is None:
        raise UsageError("Say how long to fine-tune: give --steps or --minutes (a few minutes on a CPU is a start).")
    if augment not in AUGMENT:
        raise UsageError(f"Unknown augmentation '{augment}': use {', '.join(AUGMENT)}.")
    folders = session_folders(sessions)
    held_out = session_folders(val_sessions) if val_sessions else []
    shared = {f.resolve() for f in folders} & {f.resolve() for f in held_out}
    if shared:
        raise UsageError(f"Session '{sorted(shared)[0]}' is given both to train on and to validate on: hold out sessions that training never sees.")
    old = load_pack(pack)
    manifest = old.manifest
    training = manifest.get("training") or {}
    dataset = training.get("dataset")
    if dataset not in RECIPES:
        raise UsageError(f"Pack '{old.id}' records no known training dataset ({dataset!r}): fine-tuning validates on that dataset's validation split, so it needs one of {', '.join(sorted(RECIPES))}.")
    recipe = RECIPES[dataset]
    version = bump_version(manifest.get("version"))
    run = f"finetune-{old.id}-{version}"
    workdir = Path(workdir)
    out = Path(out) if out is not None else workdir / "packs" / f"{old.id}-{version}"
    yield Progress(0, 0, f"writing {len(folders)} corrected tile(s)")
    train_folder, tiles = corrected_dataset(folders, workdir / run / "corrected", recipe.mpp)
    split_cases = evenly(recipe.cases("val", data_root), val_limit)
    val_folder = None
    if held_out:
        val_folder, _ = corrected_dataset(held_out, workdir / run / "corrected-val", recipe.mpp, split="val")
        val_cases = folder_cases(val_folder)
    else:
        val_cases = split_cases
    validation = f"{len(held_out)} held-out corrected session(s)" if held_out else f"the {dataset} validation split"
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    before = yield from _relay(validation_loss(resolve(old.path), recipe, val_cases, cancel), "validation loss of the pack")
    old_metrics = manifest.get("metrics", {})
    if held_out:
        ref_before = yield from _relay(validation_loss(resolve(old.path), recipe, split_cases, cancel), "validation-split loss of the pack")
        report = yield from _relay(evaluate_iter(resolve(old.path), recipe, val_cases, PredictConfig(tile=old.tile, overlap=old.overlap), EvalOptions(), split="val", cancel=cancel), "the pack on the held-out corrections")
        old_metrics = headline(report)
    cfg = TrainConfig(
        dataset=dataset, data_root=data_root, arch=old.architecture, config=old.config, arch_overrides=manifest.get("overrides"),
        init_from=str(old.path), train_folder=str(train_folder), val_folder=str(val_folder) if val_folder else None, train_replay=replay, freeze_norm=freeze_norm, augment=augment != "none", augment_overrides=AUGMENT[augment], crop=crop or (None if augment == "recipe" else recipe.tile), steps=steps, minutes=minutes, lr=lr, warmup=0.05, seed=seed,
        val_limit=val_limit, val_every=val_every or (max(1, steps // 2) if steps else None), workdir=str(workdir), run=run, fresh=True, out=str(out), pack_id=old.id, threads=threads,
        cpu_bf16=bool((training.get("config") or {}).get("cpu_bf16", False)),
        command=f"medseg finetune --pack {old.id} --session {' '.join(str(f) for f in folders)}" + (f" --val-session {' '.join(str(f) for f in held_out)}" if held_out else "") + (f" --steps {steps}" if steps else f" --minutes {minutes}") + f" --lr {lr:g} --augment {augment}" + (f" --crop {crop}" if crop else ""),
    )
    result = yield from train_iter(cfg, cancel)
    new = load_pack(result.pack_path)
    after = yield from _relay(validation_loss(new, recipe, val_cases, cancel), "validation loss of the new version")
    reference = None
    if held_out:
        ref_after = yield from _relay(validation_loss(new, recipe, split_cases, cancel), "validation-split loss of the new version")
        report = yield from _relay(evaluate_iter(new, recipe, split_cases, PredictConfig(tile=new.tile, overlap=new.overlap), EvalOptions(), split="val", cancel=cancel), "the new version on the validation split")
        reference = {"dataset": dataset, "split": "val", "cases": len(split_cases), "validation_loss_before": round(ref_before, 5), "validation_loss_after": round(ref_after, 5),
                     "metrics_before": manifest.get("metrics", {}), "metrics_after": headline(report)}
    previous = {"id": old.id, "version": manifest.get("version", "1.0.0"), "sha256": old.sha256, "metrics": old_metrics, "validation_loss": round(before, 5)}
    updated = dict(new.manifest)
    updated.update({
        "version": version,
        "finetuned_from": previous,
        "validation_loss": round(after, 5),
        "validation_loss_cases": len(val_cases),
        "validation": validation,
        "corrections": {"sessions": len(folders), "tiles": tiles, "held_out_sessions": [str(f.resolve()) for f in held_out]},
        "licence": manifest.get("licence", updated.get("licence")),
        "attribution": manifest.get("attribution", updated.get("attribution")),
    })
    if reference is not None:
        updated["reference_validation"] = reference
    atomic_write_text(Path(result.pack_path) / "manifest.json", json.dumps(updated, indent=2) + "\n")
    return FinetuneResult(Path(result.pack_path), version, previous, updated.get("metrics", {}), before, after, len(tiles), result.steps, result.seconds, result.history, validation, reference)


__all__ = ["FinetuneResult", "bump_version", "corrected_dataset", "finetune_iter", "session_folders", "validation_loss"]
