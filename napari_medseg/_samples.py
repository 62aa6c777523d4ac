"""Sample data contributions: the real images in ``resources/samples`` (see ATTRIBUTION.md there)."""

from __future__ import annotations

from typing import Any

from medseg.demo import Sample, get_sample
from medseg.io import read_image

from napari_medseg._io import LayerData, image_layer_data


def sample_layer_data(sample: Sample) -> list[LayerData]:
    """The sample as an image layer, scaled to its pixel size when known."""
    data, kwargs, kind = image_layer_data(
        read_image(sample.path),
        name=sample.stem,
        extra_metadata={"sample": sample.key, "title": sample.title, "modality": sample.modality, "suggested_pack": sample.pack,
                        "pixel_size": sample.pixel_size, "pixel_unit": sample.pixel_unit, "licence": sample.licence},
    )
    if sample.pixel_size is not None:
        kwargs["scale"] = (sample.pixel_size, sample.pixel_size)
    return [(data, kwargs, kind)]


def _load(key: str) -> list[LayerData]:
    return sample_layer_data(get_sample(key))


def psfhs_04400() -> list[LayerData]:
    return _load("psfhs_04400")


def psfhs_04510() -> list[LayerData]:
    return _load("psfhs_04510")


def aidpath_10172() -> list[LayerData]:
    return _load("aidpath_10172")


def hubmap_ccf_x04096_y01024() -> list[LayerData]:
    return _load("hubmap_ccf_x04096_y01024")


SAMPLE_FUNCTIONS: dict[str, Any] = {
    "psfhs_04400": psfhs_04400,
    "psfhs_04510": psfhs_04510,
    "aidpath_10172": aidpath_10172,
    "hubmap_ccf_x04096_y01024": hubmap_ccf_x04096_y01024,
}
