"""Small pieces every medseg dock uses: the device choices and a class colour map for result layers."""

from __future__ import annotations

from typing import Any, Iterable

from napari.utils.colormaps import DirectLabelColormap

TRANSPARENT = (0.0, 0.0, 0.0, 0.0)


def device_choices() -> list[tuple[str, str]]:
    """``auto`` and every device torch can use here, as (label shown, value) pairs for a ComboBox."""
    from medseg.engine.devices import available_devices

    choices = [("auto", "auto")]
    for label in available_devices():
        choices.append((label, label.split(" ")[0]))
    return choices


def class_colormap(classes: Iterable[Any]) -> DirectLabelColormap:
    """A Labels colour map with each class's colour (objects with ``value`` and ``color``); background transparent."""
    colours: dict[int | None, Any] = {None: TRANSPARENT}
    for c in classes:
        colours[c.value] = TRANSPARENT if c.value == 0 else c.color
    return DirectLabelColormap(color_dict=colours)


__all__ = ["TRANSPARENT", "class_colormap", "device_choices"]
