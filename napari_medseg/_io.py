"""Reader contribution: 2-D images, frame stacks and MetaImage files through :func:`medseg.io.read_image`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from medseg.io import IMAGE_SUFFIXES, ImageData, is_slide, read_image, stem_of

LayerData = tuple[Any, dict[str, Any], str]


def get_reader(path: str | list[str]) -> Callable[[str | list[str]], list[LayerData]] | None:
    """Return :func:`read_layers` when every path is a file type medseg reads, else ``None``."""
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    if not paths:
        return None
    for p in paths:
        if not str(p).lower().endswith(IMAGE_SUFFIXES) or Path(p).is_dir():
            return None
        if str(p).lower().endswith((".tif", ".tiff")) and is_slide(p):
            return None  # tiled/pyramidal TIFFs are slides: the slide reader opens them lazily
    return read_layers


def read_layers(path: str | list[str]) -> list[LayerData]:
    """One image layer per file: rgb flag, scale from the pixel spacing when known, name = file stem."""
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    return [image_layer_data(read_image(p)) for p in paths]


def image_layer_data(image: ImageData, name: str | None = None, extra_metadata: dict[str, Any] | None = None) -> LayerData:
    """``(data, kwargs, "image")`` for an :class:`ImageData`."""
    kwargs: dict[str, Any] = {
        "rgb": image.rgb,
        "name": name or (stem_of(image.path) if image.path is not None else image.name),
        "metadata": {"medseg": {"path": str(image.path) if image.path else None, "spacing_mm": image.spacing, "is_stack": image.is_stack, **image.metadata}},
    }
    if image.spacing is not None:
        kwargs["scale"] = ((1.0,) if image.is_stack else ()) + tuple(image.spacing)
    if extra_metadata:
        kwargs["metadata"]["medseg"].update(extra_metadata)
    return image.array, kwargs, "image"
