"""Encoder packs: a pretrained CM-CGNS network as ``manifest.json`` + ``weights.safetensors``.

The same conventions as model packs (:mod:`medseg.train.packs`): the weights are written first, the
manifest names their sha256, the sha256 is checked on load, writes are atomic, nothing is downloaded.
The manifest says which segmentation network the image encoder belongs to (architecture, config and
the key prefix of its weights), so ``medseg train --encoder-init`` can load it into that network,
and carries the report vocabulary, so retrieval can encode reports too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medseg.errors import ModelError, UsageError
from medseg.io.atomic import atomic_path, atomic_write_text
from medseg.train.packs import MANIFEST, WEIGHTS, sha256_file

KIND = "cmcgns-encoder"
NORMALISATION = {"kind": "fixed", "mean": [0.5], "std": [0.5], "scale": 255.0}


@dataclass
class EncoderPack:
    """A loaded encoder pack: the whole CM-CGNS network (eval mode), its vocabulary and manifest."""

    model: Any  # CMCGNS
    vocab: Any  # Vocabulary
    manifest: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def sha256(self) -> str:
        return self.manifest["weights"]["sha256"]

    @property
    def image_size(self) -> int:
        return int(self.model.spec.image_size)


def save_encoder_pack(model: nn.Module, vocab, folder: str | Path, pack_id: str, extra: dict[str, Any] | None = None, dtype: torch.dtype = torch.float16) -> Path:
    """Write ``model`` (a :class:`~medseg.pretrain.model.CMCGNS`) and ``vocab`` as an encoder pack folder."""
    from safetensors.torch import save_file

    from medseg.models import count_parameters
    from medseg.pretrain.model import ENCODER_PREFIX

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: (v.detach().to(dtype) if v.is_floating_point() else v.detach()).contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(folder / WEIGHTS) as tmp:
        save_file(state, str(tmp))
    spec = model.spec
    manifest: dict[str, Any] = {
        "id": pack_id,
        "kind": KIND,
        "version": "1.0.0",
        "title": f"CM-CGNS image-report encoder ({spec.arch}/{spec.config} image encoder)",
        "method": "CM-CGNS (Lan et al., arXiv 2506.11674): global InfoNCE, local image and report losses with cluster-guided negative sampling, cross-modal masked image reconstruction",
        "image_encoder": {
            "architecture": spec.arch,
            "config": spec.config,
            "prefix": ENCODER_PREFIX,
            "segmentation_prefix": "downs.",
            "in_channels": 3,
            "channels": int(model.image_encoder.channels),
            "stride": int(model.image_encoder.stride),
            "parameters": count_parameters(model.image_encoder),
        },
        "text_encoder": {
            "kind": "word-level transformer trained on the pretraining reports",
            "width": spec.text_width,
            "layers": spec.text_layers,
            "parameters": count_parameters(model.text_encoder),
        },
        "spec": spec.to_dict(),
        "image_size": spec.image_size,
        "normalisation": NORMALISATION,
        "vocab": list(vocab.words),
        "weights": {"file": WEIGHTS, "sha256": sha256_file(folder / WEIGHTS), "dtype": str(dtype).replace("torch.", "")},
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    manifest.update(extra or {})
    atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return folder


def read_encoder_manifest(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        raise UsageError(f"'{folder}' is not an encoder pack (no {MANIFEST}): give the folder written by 'medseg pretrain -o'.")
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ModelError(f"The manifest of '{folder}' is not valid JSON ({exc.msg} at line {exc.lineno}): write the encoder again with 'medseg pretrain'.") from exc
    if manifest.get("kind") != KIND:
        raise UsageError(f"'{folder}' is a {manifest.get('kind', 'segmentation')} pack, not a CM-CGNS encoder: give the folder written by 'medseg pretrain -o'.")
    return manifest


def _verified_state(folder: Path, manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    weights = folder / manifest.get("weights", {}).get("file", WEIGHTS)
    if not weights.is_file():
        raise ModelError(f"Encoder pack '{folder}' has no weights file '{weights.name}': copy the whole folder again.")
    expected = manifest.get("weights", {}).get("sha256")
    actual = sha256_file(weights)
    if not expected or actual != expected:
        raise ModelError(
            f"Encoder pack '{folder}' failed its integrity check (weights sha256 {actual[:12]}... != manifest {str(expected)[:12]}...): "
            "the files were changed or damaged; copy the folder again or rerun 'medseg pretrain'."
        )
    return {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(weights)).items()}


def load_encoder_pack(folder: str | Path, device: str | torch.device = "cpu") -> EncoderPack:
    """Load and verify an encoder pack; the network comes back in eval mode."""
    from medseg.pretrain.model import CMCGNS, ModelSpec
    from medseg.pretrain.text import Vocabulary

    folder = Path(folder)
    manifest = read_encoder_manifest(folder)
    state = _verified_state(folder, manifest)
    try:
        spec = ModelSpec.from_dict(manifest["spec"])
        vocab = Vocabulary(tuple(manifest["vocab"]))
        model = CMCGNS(spec)
        model.load_state_dict(state, strict=True)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise ModelError(f"Encoder pack '{folder}' does not match its own manifest ({type(exc).__name__}): write it again with 'medseg pretrain'.") from exc
    return EncoderPack(model.eval().to(device), vocab, manifest, folder)


def init_segmentation_encoder(model: nn.Module, folder: str | Path, arch: str, config: str) -> dict[str, Any]:
    """Copy a pretrained image encoder into a segmentation network of the same architecture and config.

    Every encoder tensor must find its place (same key after the prefix, same shape); anything else
    is refused with a sentence. Returns what was loaded, for the pack's training record."""
    folder = Path(folder)
    manifest = read_encoder_manifest(folder)
    enc = manifest.get("image_encoder", {})
    if enc.get("architecture") != arch or enc.get("config") != config:
        raise UsageError(
            f"Encoder '{folder}' was pretrained as a {enc.get('architecture')}/{enc.get('config')} encoder, not {arch}/{config}: "
            f"train with --arch {enc.get('architecture')} --config {enc.get('config')}, or pretrain a matching encoder."
        )
    state = _verified_state(folder, manifest)
    prefix, target = enc.get("prefix", "image_encoder."), enc.get("segmentation_prefix", "downs.")
    encoder = {target + k[len(prefix + target):]: v for k, v in state.items() if k.startswith(prefix + target)}
    own = model.state_dict()
    bad = [k for k, v in encoder.items() if k not in own or own[k].shape != v.shape]
    if not encoder or bad:
        raise UsageError(
            f"Encoder '{folder}' does not fit this network ({len(bad)} of {len(encoder)} tensors have no place, e.g. '{(bad or ['-'])[0]}'): "
            "pretrain an encoder for this architecture and input channels."
        )
    own.update(encoder)
    model.load_state_dict(own)
    return {"encoder": manifest.get("id", folder.name), "folder": str(folder), "sha256": manifest["weights"]["sha256"], "loaded_tensors": len(encoder)}


__all__ = ["EncoderPack", "KIND", "init_segmentation_encoder", "load_encoder_pack", "read_encoder_manifest", "save_encoder_pack"]
