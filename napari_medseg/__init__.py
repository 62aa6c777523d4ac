"""napari-medseg: the napari plugin of medseg (dock widgets, reader, sample data). Thin: no algorithms.

The headless core lives in :mod:`medseg`; this package only turns its functions into widgets and layers.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
