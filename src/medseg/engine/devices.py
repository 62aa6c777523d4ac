"""Device choice: ``auto`` picks cuda, then mps, then cpu."""

from __future__ import annotations

import contextlib

import torch

from medseg.errors import UsageError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """Turn ``auto``/``cpu``/``cuda[:n]``/``mps`` into an available :class:`torch.device`."""
    if isinstance(name, torch.device):
        return name
    name = (name or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"Device '{name}' was asked for but no CUDA GPU is available: use --device cpu or auto.")
        return torch.device(name)
    if name == "mps":
        if not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
            raise UsageError("Device 'mps' was asked for but is not available: use --device cpu or auto.")
        return torch.device("mps")
    if name == "cpu":
        return torch.device("cpu")
    raise UsageError(f"Unknown device '{name}': choose one of {', '.join(DEVICE_CHOICES)}.")


def autocast(device: torch.device):
    """Mixed precision on GPUs (bf16 where supported, else fp16); a no-op on the CPU."""
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def device_name(device: torch.device) -> str:
    """What a run records as its device: the GPU's name for CUDA, else ``cpu`` / ``mps``."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)


def available_devices() -> list[str]:
    found = ["cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        found.append("mps")
    return found
