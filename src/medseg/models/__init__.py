"""Model registry and the networks. Importing this package registers every network.

Use :func:`build` to instantiate one, :func:`names` to list them and :func:`card` for its model card.
"""

from __future__ import annotations

import importlib

from medseg.models.registry import ModelCard, build, card, count_macs, count_parameters, names, register

# One module per network; each registers itself on import.
_NETWORK_MODULES = (
    "unet",
    "tcsaformer",
    "dcaunet",
    "medformer",
    "mslaunet",
    "tapslf",
    "fulltransnet",
    "dmafnet",
)

for _module in _NETWORK_MODULES:
    importlib.import_module(f"medseg.models.{_module}")

__all__ = ["ModelCard", "build", "card", "count_macs", "count_parameters", "names", "register"]
