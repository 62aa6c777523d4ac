"""napari-medseg headless core: networks, packs, tiled inference, metrics and the ``medseg`` command.

Nothing in this package imports Qt or napari.
"""

__version__ = "0.1.0"

from medseg.errors import MedsegError  # noqa: E402

__all__ = ["MedsegError", "__version__"]
