"""Small pieces every medseg dock uses: the device choices, the chosen pack's manifest and a class colour map
for result layers."""

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


def chosen_manifest(pack_id: str | None, none_installed: str) -> tuple[dict[str, Any] | None, str]:
    """The manifest of the pack chosen in a dock, or ``(None, the sentence to show instead)``."""
    from medseg.errors import MedsegError
    from medseg.train.packs import available_packs, read_manifest

    if pack_id is None:
        return None, none_installed
    try:
        return read_manifest(available_packs(kind=None)[pack_id]), ""
    except (KeyError, MedsegError) as exc:
        return None, str(exc)


def class_colormap(classes: Iterable[Any]) -> DirectLabelColormap:
    """A Labels colour map with each class's colour (objects with ``value`` and ``color``); background transparent."""
    colours: dict[int | None, Any] = {None: TRANSPARENT}
    for c in classes:
        colours[c.value] = TRANSPARENT if c.value == 0 else c.color
    return DirectLabelColormap(color_dict=colours)


__all__ = ["TRANSPARENT", "chosen_manifest", "class_colormap", "device_choices"]
