"""Two-stage CM-CGNS pretraining on image-report pairs, written once as a generator (spec §8.4-§8.7).

Stage I aligns images and reports (global InfoNCE + local image loss + local report loss with
cluster-guided negative sampling once the centroids have started); stage II adds the cross-modal
masked image reconstruction. The optimiser and schedule (warm-up over one epoch, cosine to 0) are
rebuilt at the start of stage II. A checkpoint is written after every epoch to
``<workdir>/pretrain/<run>/ckpt.pt`` and ``--resume`` continues from it; an epoch's batches, crops
and masks are pure functions of (seed, epoch, step), so a resumed run sees the same data. Stage-II
weights are chosen by the lowest loss on held-out patients (when there are any), then written as an
encoder pack.

``method="infonce"`` trains the same network with the global loss alone for the same number of
steps (no local losses, no clusters, no reconstruction): the ablation of the benchmark.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from medseg.engine.devices import resolve_device
from medseg.engine.progress import CancelToken, Job, Progress
from medseg.errors import Cancelled, InputError, UsageError
from medseg.io.atomic import atomic_path
from medseg.pretrain.data import PairRecord, centre_crop, epoch_batches, holdout_groups, load_images, load_size, random_crop, read_pairs, to_tensor
from medseg.pretrain.losses import clusters_for, global_infonce, local_image_loss, local_report_loss, masked_reconstruction_loss, random_token_mask
from medseg.pretrain.model import CMCGNS, ModelSpec
from medseg.pretrain.pack import save_encoder_pack
from medseg.pretrain.text import Vocabulary, encode_reports, has_sentences, split_sentences
from medseg.train.loop import make_optimizer, seed_everything, warmup_cosine

CHECKPOINT = "ckpt.pt"
METHODS = ("cmcgns", "infonce")


@dataclass
class PretrainConfig:
    """Everything a pretraining run depends on."""

    pairs: str | None = None  # CSV of image-report pairs
    image_col: str = "image"
    text_col: str = "text"
    group_col: str | None = "patientid"
    out: str | None = None  # encoder pack folder (default <workdir>/pretrain/<run>/encoder)
    method: str = "cmcgns"
    arch: str = "unet"
    config: str = "small"
    image_size: int = 96
    dim: int = 128
    text_width: int = 128
    text_layers: int = 2
    batch_size: int = 16
    stage1_epochs: int = 10
    stage2_epochs: int = 20
    lr: float = 3e-4
    weight_decay: float = 1e-6
    warmup_epochs: float = 1.0
    clusters: int | None = None  # default: scaled to the number of sentences (losses.clusters_for)
    cluster_start_cos: float = 0.4
    hard_weight: float = 3.0
    exclude_other_hard: bool = False
    centroid_momentum: float = 0.001
    centroid_update: str = "sum"
    fn_alpha: float = 0.2
    fn_beta: float = 0.5
    fn_weight: float = 1e-4
    mask_ratio: float = 0.5
    rec_weight: float = 10.0
    val_fraction: float = 0.1  # share of groups (patients) held out for stage-II weight selection
    seed: int = 42
    device: str = "auto"
    threads: int | None = None
    workdir: str = "work"
    run: str | None = None
    resume: bool = False
    fresh: bool = False
    pack_id: str | None = None
    command: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def run_name(self) -> str:
        return self.run or f"{Path(self.pairs or 'pairs').stem}-{self.method}-{self.arch}-{self.config}"

    @property
    def run_dir(self) -> Path:
        return Path(self.workdir) / "pretrain" / self.run_name


@dataclass
class PretrainResult:
    pack_path: Path | None
    run_dir: Path
    steps: int
    seconds: float
    cluster_start_step: int | None
    history: list[dict[str, Any]] = field(default_factory=list)
    model: CMCGNS | None = None
    vocab: Vocabulary | None = None


# --------------------------------------------------------------------------- one step's losses
def batch_losses(model: CMCGNS, images: torch.Tensor, reports, stage: int, cfg: PretrainConfig, training: bool, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The losses of one batch; in training also moves (or starts) the centroids. ``total`` is what is minimised."""
    img = model.encode_image(images)
    rep = model.encode_reports(reports)
    out = {"global": global_infonce(img.global_, rep.global_, model.logit_scale)}
    if cfg.method == "infonce":
        out["total"] = out["global"]
        return out
    text_to_image, image_to_text = model.cross(img.tokens, rep.sentences, rep.valid)
    out["local_image"] = local_image_loss(img.tokens, text_to_image, model.predictor)
    z1, z2 = rep.sentences[rep.valid], image_to_text[rep.valid]
    clusters = model.clusters
    centroids = None
    if clusters.active:
        if training:
            clusters.update(z2)
        centroids = clusters.centroids
    local = local_report_loss(
        z1, z2, centroids, hard_weight=cfg.hard_weight, exclude_other_hard=cfg.exclude_other_hard, alpha=cfg.fn_alpha, beta=cfg.fn_beta, fn_weight=cfg.fn_weight
    )
    if training and not clusters.active and float(local["sim"].detach().mean()) <= cfg.cluster_start_cos and z2.shape[0] >= clusters.k:
        clusters.start(z2, first=int(torch.randint(z2.shape[0], (1,), generator=generator)))  # active from the next step on
    out["local_report"] = local["loss"]
    out["false_negative"] = local["false_negative"].detach()
    total = out["global"] + out["local_image"] + out["local_report"]
    if stage == 2:
        mask = random_token_mask(images.shape[0], img.grid, cfg.mask_ratio, generator).to(images.device)
        rec = model.reconstruct(img.tokens, text_to_image, mask, img.grid)
        out["reconstruction"] = masked_reconstruction_loss(rec, images.expand(-1, 3, -1, -1), mask, cfg.rec_weight)
        total = total + out["reconstruction"]
    out["total"] = total
    return out


# --------------------------------------------------------------------------- the run
def _save(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _state_copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


class _Pretrainer:
    def __init__(self, cfg: PretrainConfig, records: Sequence[PairRecord] | None) -> None:
        if cfg.method not in METHODS:
            raise UsageError(f"Unknown pretraining method '{cfg.method}': choose {' or '.join(METHODS)}.")
        if cfg.image_size < 32 or cfg.image_size % 16:
            raise UsageError(f"Image size {cfg.image_size} must be a multiple of 16 and at least 32 (the U-Net encoder's stride is 16).")
        if cfg.batch_size < 2:
            raise UsageError(f"Batch size {cfg.batch_size} is too small: contrastive pretraining needs at least 2 pairs per batch.")
        if cfg.stage1_epochs < 0 or cfg.stage2_epochs < 0 or cfg.stage1_epochs + cfg.stage2_epochs < 1:
            raise UsageError("Give at least one epoch in stage I or stage II (--stage1-epochs, --stage2-epochs).")
        self.cfg = cfg
        if records is None:
            if not cfg.pairs:
                raise UsageError("Give the image-report pairs: --pairs FILE.csv.")
            records = read_pairs(cfg.pairs, cfg.image_col, cfg.text_col, cfg.group_col)
        usable = [r for r in records if has_sentences(r.text)]
        self.dropped = len(records) - len(usable)
        held = holdout_groups(usable, cfg.val_fraction)
        self.train_records = [r for r in usable if r.group not in held]
        self.val_records = [r for r in usable if r.group in held]
        if len({r.text for r in self.val_records}) < 2:
            self.train_records, self.val_records = usable, []
        if len({r.text for r in self.train_records}) < 2:
            raise InputError(
                f"Only {len({r.text for r in self.train_records})} distinct usable report(s) among {len(records)} pairs: "
                "pretraining needs at least 2 reports of 3 or more words (check --text-col)."
            )
        self.device = resolve_device(cfg.device)
        self.run_dir = cfg.run_dir
        self.ckpt_path = self.run_dir / CHECKPOINT

    # ---------------------------------------------------------------- pieces
    def new_spec(self, vocab: Vocabulary) -> ModelSpec:
        cfg = self.cfg
        distinct = {r.text for r in self.train_records}
        k = cfg.clusters or clusters_for(sum(len(split_sentences(t)) for t in distinct))
        return ModelSpec(cfg.arch, cfg.config, cfg.image_size, cfg.dim, text_width=cfg.text_width, text_layers=cfg.text_layers, vocab_size=len(vocab), clusters=int(k))

    def make_model(self, spec: ModelSpec) -> CMCGNS:
        model = CMCGNS(spec).to(self.device)
        model.clusters.momentum = self.cfg.centroid_momentum
        model.clusters.update_rule = self.cfg.centroid_update
        return model

    def schedule(self, stage: int) -> None:
        cfg = self.cfg
        steps = self.steps_per_epoch * (cfg.stage1_epochs if stage == 1 else cfg.stage2_epochs)
        self.optimizer = make_optimizer(self.model, cfg.lr, cfg.weight_decay)
        warm = max(1, int(round(cfg.warmup_epochs * self.steps_per_epoch)))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_cosine(steps, warm, 0.0))

    def reports(self, idx: np.ndarray, records: Sequence[PairRecord]):
        spec = self.model.spec
        return encode_reports([records[i].text for i in idx], self.vocab, spec.max_words, spec.max_sentences).to(self.device)

    def stages(self) -> list[tuple[int, int]]:
        return [(s, n) for s, n in ((1, self.cfg.stage1_epochs), (2, self.cfg.stage2_epochs)) if n > 0]

    def checkpoint(self) -> dict[str, Any]:
        return {
            "format": 1,
            "stage": self.stage,
            "epoch": self.epoch,
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "history": self.history,
            "best_loss": self.best_loss,
            "best_state": self.best_state,
            "cluster_start_step": self.cluster_start_step,
            "vocab": list(self.vocab.words),
            "spec": self.model.spec.to_dict(),
            "config": self.cfg.to_dict(),
            "elapsed": self.elapsed(),
        }

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.t0

    @torch.no_grad()
    def validation_loss(self, stage: int) -> float:
        if not self.val_records:
            return math.nan
        self.model.eval()
        texts = [r.text for r in self.val_records]
        size = self.cfg.image_size
        total, count = 0.0, 0
        for j, idx in enumerate(epoch_batches(texts, self.cfg.batch_size, self.cfg.seed, 10**6)):
            x = to_tensor(centre_crop(self.val_images[idx], size)).to(self.device)
            g = torch.Generator().manual_seed(self.cfg.seed + 7919 * (j + 1))
            total += float(batch_losses(self.model, x, self.reports(idx, self.val_records), stage, self.cfg, False, g)["total"]) * len(idx)
            count += len(idx)
        self.model.train()
        return total / count

    # ---------------------------------------------------------------- run
    def run(self, cancel: CancelToken | None) -> Job[PretrainResult]:
        cfg = self.cfg
        if cfg.threads:
            torch.set_num_threads(int(cfg.threads))
        self.t0, self.elapsed_before = time.perf_counter(), 0.0
        if self.ckpt_path.exists() and not (cfg.resume or cfg.fresh):
            raise UsageError(f"Run '{cfg.run_name}' already has a checkpoint ({self.ckpt_path}): add --resume to continue it, --fresh to start over, or choose another --run.")
        ckpt = torch.load(self.ckpt_path, map_location="cpu", weights_only=False) if cfg.resume and self.ckpt_path.exists() else None
        seed_everything(cfg.seed, False, self.device)
        if ckpt is not None:
            self.vocab = Vocabulary(tuple(ckpt["vocab"]))
            spec = ModelSpec.from_dict(ckpt["spec"])
        else:
            self.vocab = Vocabulary.build(r.text for r in self.train_records)
            spec = self.new_spec(self.vocab)
        self.model = self.make_model(spec)
        texts = [r.text for r in self.train_records]
        self.steps_per_epoch = len(epoch_batches(texts, cfg.batch_size, cfg.seed, 0))
        big = load_size(cfg.image_size)
        self.images = yield from load_images(self.train_records, big, cancel)
        self.val_images = (yield from load_images(self.val_records, big, cancel)) if self.val_records else None
        self.stage, self.epoch, self.step = self.stages()[0][0], 0, 0
        self.history: list[dict[str, Any]] = []
        self.best_loss, self.best_state, self.cluster_start_step = math.inf, None, None
        self.schedule(self.stage)
        if ckpt is not None:
            self.model.load_state_dict(ckpt["model"])
            self.stage, self.epoch, self.step = int(ckpt["stage"]), int(ckpt["epoch"]), int(ckpt["step"])
            self.schedule(self.stage)
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
            torch.set_rng_state(ckpt["torch_rng"])
            self.history, self.best_loss, self.best_state = list(ckpt["history"]), float(ckpt["best_loss"]), ckpt["best_state"]
            self.cluster_start_step, self.elapsed_before = ckpt["cluster_start_step"], float(ckpt["elapsed"])
        self.run_dir.mkdir(parents=True, exist_ok=True)
        log = self.run_dir / "log.jsonl"
        if self.step == 0 and log.exists():
            log.unlink()
        total = self.steps_per_epoch * sum(n for _, n in self.stages())
        self.model.train()
        for stage, epochs in self.stages():
            if stage < self.stage:
                continue
            if stage != self.stage:  # stage II starts: optimiser and schedule rebuilt (spec §8.7)
                self.stage, self.epoch = stage, 0
                self.schedule(stage)
            while self.epoch < epochs:
                sums: dict[str, float] = {}
                crops = np.random.default_rng([cfg.seed, stage, self.epoch, 1])
                for idx in epoch_batches(texts, cfg.batch_size, cfg.seed, 1000 * stage + self.epoch):
                    if cancel is not None and cancel.cancelled:
                        raise Cancelled(f"Pretraining cancelled at step {self.step} of {total}; the checkpoint of the last whole epoch is in '{self.run_dir}': continue with --resume.")
                    x = to_tensor(random_crop(self.images[idx], cfg.image_size, crops)).to(self.device)
                    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.step)
                    was_active = self.model.clusters.active
                    losses = batch_losses(self.model, x, self.reports(idx, self.train_records), stage, cfg, True, g)
                    if not was_active and self.model.clusters.active:
                        self.cluster_start_step = self.step + 1
                    self.optimizer.zero_grad(set_to_none=True)
                    losses["total"].backward()
                    self.optimizer.step()
                    self.scheduler.step()
                    self.step += 1
                    value = float(losses["total"].detach())
                    if not math.isfinite(value):
                        raise UsageError(f"The loss became {value} at step {self.step}: lower --lr (now {cfg.lr}).")
                    for k, v in losses.items():
                        sums[k] = sums.get(k, 0.0) + float(v.detach())
                    yield Progress(self.step, total, f"stage {'I' * stage} epoch {self.epoch + 1}/{epochs} loss {value:.3f}")
                self.epoch += 1
                val = self.validation_loss(stage)
                entry = {"stage": stage, "epoch": self.epoch, "step": self.step, **{k: round(v / self.steps_per_epoch, 5) for k, v in sums.items()},
                         "val_total": None if math.isnan(val) else round(val, 5), "clusters_active": self.model.clusters.active,
                         "lr": self.scheduler.get_last_lr()[0], "elapsed_s": round(self.elapsed(), 1)}
                self.history.append(entry)
                with open(log, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps(entry) + "\n")
                if stage == self.stages()[-1][0] and not math.isnan(val) and val < self.best_loss:
                    self.best_loss, self.best_state = val, _state_copy(self.model)
                _save(self.ckpt_path, self.checkpoint())
        return self.finish()

    def finish(self) -> PretrainResult:
        cfg = self.cfg
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        self.model.eval()
        out = Path(cfg.out) if cfg.out else self.run_dir / "encoder"
        training = {
            "pairs": cfg.pairs,
            "train_pairs": len(self.train_records),
            "val_pairs": len(self.val_records),
            "distinct_train_reports": len({r.text for r in self.train_records}),
            "dropped_pairs_without_sentences": self.dropped,
            "method": cfg.method,
            "steps": self.step,
            "stage1_epochs": cfg.stage1_epochs,
            "stage2_epochs": cfg.stage2_epochs,
            "cluster_start_step": self.cluster_start_step,
            "best_val_loss": None if not math.isfinite(self.best_loss) else round(self.best_loss, 5),
            "seconds": round(self.elapsed(), 1),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "config": {k: v for k, v in cfg.to_dict().items() if k != "command"},
        }
        pack_id = cfg.pack_id or cfg.run_name
        path = save_encoder_pack(self.model, self.vocab, out, pack_id, extra={"training": training, "command": cfg.command, "history": self.history})
        return PretrainResult(path, self.run_dir, self.step, self.elapsed(), self.cluster_start_step, self.history, self.model, self.vocab)


def pretrain_iter(config: PretrainConfig, records: Sequence[PairRecord] | None = None, cancel: CancelToken | None = None) -> Job[PretrainResult]:
    """Generator: yields :class:`Progress` per step, returns the :class:`PretrainResult` (encoder pack written).

    ``records`` replaces reading ``config.pairs`` (cross-validation folds, tests)."""
    trainer = _Pretrainer(config, records)
    return (yield from trainer.run(cancel))


__all__ = ["PretrainConfig", "PretrainResult", "batch_losses", "pretrain_iter"]
