"""Model packs: what a user runs. A folder with ``manifest.json`` + ``weights.safetensors``.

Packs are found by id in, in order: an explicit folder path, the folders listed in
``MEDSEG_MODELS`` (``os.pathsep``-separated; each holds ``<id>/manifest.json``), and the packs shipped in
``medseg/resources/packs``. The weights' sha256 is checked on load; a manifest that does not match
its architecture is refused. Nothing is downloaded.

This module must stay free of training code (no optimiser, dataset or augmentation imports) because
inference loads packs too.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medseg.errors import ModelError, UsageError
from medseg.io.atomic import atomic_path, atomic_write_text
from medseg.normalise import Normaliser

MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
DEFAULT_COLOURS = ["#000000", "#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6", "#bcf60c", "#fabebe"]


@dataclass(frozen=True)
class ClassInfo:
    value: int
    name: str
    color: str

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "name": self.name, "color": self.color}


def default_classes(n: int, names: list[str] | None = None) -> list[ClassInfo]:
    names = names or (["background"] + [f"class {i}" for i in range(1, n)])
    return [ClassInfo(i, names[i], DEFAULT_COLOURS[i % len(DEFAULT_COLOURS)]) for i in range(n)]


@dataclass
class Pack:
    """A runnable model: the network with everything needed to feed it and read its output."""

    id: str
    model: nn.Module
    architecture: str
    config: str
    in_channels: int
    classes: list[ClassInfo]
    normaliser: Normaliser = field(default_factory=Normaliser)
    activation: str = "softmax"  # or "sigmoid" (one output channel) or "none"
    mpp: float | None = None
    tile: int = 256
    overlap: float = 0.25
    interactive: bool = False
    manifest: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    trained: bool = True

    @property
    def num_outputs(self) -> int:
        return 1 if self.activation == "sigmoid" else len(self.classes)

    @property
    def sha256(self) -> str | None:
        return self.manifest.get("weights", {}).get("sha256")

    def class_names(self) -> dict[int, str]:
        return {c.value: c.name for c in self.classes}

    def describe(self) -> str:
        return f"{self.id} ({self.architecture}/{self.config}, {self.in_channels} ch, classes: {', '.join(c.name for c in self.classes)})"


# --------------------------------------------------------------------------- locating packs
def resources_dir() -> Path:
    """The shipped resources: inside the installed package, or the repository root in a source tree."""
    packaged = Path(str(importlib.resources.files("medseg"))) / "resources"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[3] / "resources"


def search_dirs() -> list[Path]:
    dirs = [Path(p) for p in os.environ.get("MEDSEG_MODELS", "").split(os.pathsep) if p]
    dirs.append(resources_dir() / "packs")
    return dirs


def available_packs(kind: str | None = "segmentation") -> dict[str, Path]:
    """Pack id -> folder, earlier search folders winning.

    Only packs of ``kind`` (the manifest's ``kind``; segmentation packs have none): image-report
    encoders written by ``medseg pretrain`` are packs too, but they segment nothing. ``None`` lists
    every pack. A manifest that cannot be read is listed, so that loading it says what is wrong.
    """
    found: dict[str, Path] = {}
    for d in search_dirs():
        if not d.is_dir():
            continue
        for sub in sorted(d.iterdir()):
            if (sub / MANIFEST).is_file() and sub.name not in found and (kind is None or pack_kind(sub) in (kind, None)):
                found[sub.name] = sub
    return found


def pack_kind(folder: Path) -> str | None:
    """The manifest's kind (``multisequence`` when it names sequences, else ``segmentation``, when it says none);
    ``None`` when the manifest is unreadable."""
    try:
        manifest = read_manifest(folder)
    except (ModelError, OSError):
        return None
    if not isinstance(manifest, dict):
        return None
    if "kind" not in manifest and manifest.get("sequences"):
        return "multisequence"  # several co-registered sequences per case (DMAF-Net): medseg multiseq, not the Predictor
    return str(manifest.get("kind", "segmentation"))


def read_manifest(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ModelError(f"The manifest of pack '{folder.name}' is not valid JSON ({exc.msg} at line {exc.lineno}): restore it from the original pack.") from exc


def find_pack(name: str | os.PathLike) -> Path:
    path = Path(name)
    if (path / MANIFEST).is_file():
        return path
    packs = available_packs(kind=None)
    if str(name) in packs:
        return packs[str(name)]
    raise UsageError(
        f"No pack named '{name}': choose one of {', '.join(sorted(packs)) or '(none installed)'}, give a pack folder, "
        "or add a folder of packs to MEDSEG_MODELS."
    )


# --------------------------------------------------------------------------- load / save
def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_pack(name: str | os.PathLike, device: str | torch.device = "cpu") -> Pack:
    """Load a pack by id or folder, verifying its weights' sha256 and its architecture."""
    from safetensors.torch import load_file

    from medseg import models

    folder = find_pack(name)
    manifest = read_manifest(folder)
    weights = folder / manifest.get("weights", {}).get("file", WEIGHTS)
    if not weights.is_file():
        raise ModelError(f"Pack '{folder.name}' has no weights file '{weights.name}': reinstall the pack.")
    expected = manifest.get("weights", {}).get("sha256")
    if not expected:
        raise ModelError(f"Pack '{folder.name}' records no sha256 for its weights: it cannot be verified; re-export it with 'medseg train'.")
    actual = sha256_file(weights)
    if actual != expected:
        raise ModelError(
            f"Pack '{folder.name}' failed its integrity check (weights sha256 {actual[:12]}... != manifest {expected[:12]}...): "
            "the files were changed or damaged; reinstall the pack."
        )
    try:
        arch, config = manifest["architecture"], manifest.get("config", "small")
        classes = [ClassInfo(int(c["value"]), str(c["name"]), str(c.get("color", DEFAULT_COLOURS[i % 10]))) for i, c in enumerate(manifest["classes"])]
        in_channels = int(manifest["in_channels"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"The manifest of pack '{folder.name}' lacks or mangles a required field ({exc}): restore it from the original pack.") from exc
    activation = manifest.get("activation", "softmax")
    n_out = 1 if activation == "sigmoid" else len(classes)
    model = models.build(arch, in_channels=in_channels, num_classes=n_out, config=config, **manifest.get("overrides", {}))
    if manifest.get("interactive"):
        from medseg.models.guided import GuidedNet

        guidance = len(manifest.get("click_encoding", {}).get("channels", ()))
        if not guidance:
            raise ModelError(f"Pack '{folder.name}' is marked interactive but its manifest names no click channels: re-export the pack.")
        model = GuidedNet(model, guidance)
    state = load_file(str(weights))
    try:
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=True)
    except RuntimeError as exc:
        raise ModelError(
            f"Pack '{folder.name}' does not match its architecture '{arch}/{config}' with {in_channels} channel(s) and {n_out} output(s): "
            "the manifest and weights come from different models; re-export the pack."
        ) from exc
    model.eval().to(device)
    return Pack(
        id=manifest.get("id", folder.name),
        model=model,
        architecture=arch,
        config=config,
        in_channels=in_channels,
        classes=classes,
        normaliser=Normaliser.from_spec(manifest.get("normalisation")),
        activation=activation,
        mpp=manifest.get("mpp"),
        tile=int(manifest.get("tile", 256)),
        overlap=float(manifest.get("overlap", 0.25)),
        interactive=bool(manifest.get("interactive", False)),
        manifest=manifest,
        path=folder,
    )


def save_pack(pack: Pack, folder: str | os.PathLike, dtype: torch.dtype = torch.float16, extra: dict[str, Any] | None = None) -> Path:
    """Write ``pack`` as a pack folder (weights first, then the manifest that names their sha256)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: (v.detach().to(dtype) if v.is_floating_point() else v.detach()).contiguous().cpu() for k, v in pack.model.state_dict().items()}
    with atomic_path(folder / WEIGHTS) as tmp:
        save_file(state, str(tmp))
    manifest = dict(pack.manifest)
    manifest.update(
        {
            "id": pack.id,
            "version": manifest.get("version", "1.0.0"),
            "architecture": pack.architecture,
            "config": pack.config,
            "in_channels": pack.in_channels,
            "classes": [c.to_dict() for c in pack.classes],
            "normalisation": pack.normaliser.to_spec(),
            "activation": pack.activation,
            "mpp": pack.mpp,
            "tile": pack.tile,
            "overlap": pack.overlap,
            "interactive": pack.interactive,
            "weights": {"file": WEIGHTS, "sha256": sha256_file(folder / WEIGHTS), "dtype": str(dtype).replace("torch.", "")},
        }
    )
    manifest.update(extra or {})
    atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    pack.manifest, pack.path = manifest, folder
    return folder


def untrained_pack(architecture: str, in_channels: int = 3, num_classes: int = 2, config: str = "small", **kwargs: Any) -> Pack:
    """A pack around a freshly initialised network (tests, benchmarks, comparisons of architectures)."""
    from medseg import models

    model = models.build(architecture, in_channels=in_channels, num_classes=num_classes, config=config).eval()
    return Pack(
        id=f"{architecture}-untrained",
        model=model,
        architecture=architecture,
        config=config,
        in_channels=in_channels,
        classes=default_classes(num_classes),
        trained=False,
        **kwargs,
    )


def resolve(name: str | os.PathLike | Pack, device: str | torch.device = "cpu", allow_untrained: bool = False) -> Pack:
    """A pack by id/folder; with ``allow_untrained`` also a bare architecture name (random weights)."""
    if isinstance(name, Pack):
        return name
    try:
        return load_pack(name, device)
    except UsageError:
        from medseg import models

        if allow_untrained and str(name) in models.names():
            return untrained_pack(str(name))
        if str(name) in models.names():
            raise UsageError(
                f"'{name}' is an architecture without trained weights: choose a pack ({', '.join(sorted(available_packs())) or 'none installed'}) "
                "or train one with 'medseg train'."
            ) from None
        raise
