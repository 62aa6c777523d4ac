"""``python -m napari_medseg.demo``: napari with the Segment widget docked and the sample images loaded.

The samples are laid out side by side; each one whose suggested pack is installed is segmented in turn
(in the widget's worker thread, so the viewer stays usable meanwhile). ``make demo`` runs this when a
display exists and the headless :mod:`medseg.demo` otherwise.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

PLUGIN = "napari-medseg"
GAP = 32.0  # world units between samples


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m napari_medseg.demo", description="Open napari with the samples and the Segment widget.")
    parser.add_argument("--pack", default=None, help="run this pack on every sample instead of each sample's own")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda or mps")
    parser.add_argument("--screenshot", default=None, metavar="PNG", help="save a screenshot of the window once the runs are done, then quit")
    args = parser.parse_args(argv)

    import napari
    from napari.utils.notifications import show_info

    from medseg.demo import load_samples
    from medseg.train.packs import available_packs

    viewer = napari.Viewer(title="napari-medseg demo")
    viewer.window.resize(1280, 900)
    samples = load_samples()
    x = 0.0
    pairs = []
    for sample in samples:
        for layer in viewer.open_sample(PLUGIN, sample.key):
            layer.translate = (0.0, x)
            x += layer.data.shape[1] * layer.scale[-1] + GAP
            pairs.append((layer, args.pack or sample.pack))
    _dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment")
    widget.device.value = args.device if args.device in widget.device.choices else "auto"
    viewer.reset_view()

    installed = available_packs()
    queue = [(layer, pack) for layer, pack in pairs if pack in installed]
    missing = sorted({pack for _, pack in pairs if pack not in installed})
    if missing:
        show_info(f"Not installed yet: {', '.join(missing)}; those samples are loaded but not segmented.")

    def finish() -> None:
        viewer.reset_view()
        if args.screenshot:
            viewer.screenshot(path=args.screenshot, canvas_only=False)
            print(f"screenshot: {args.screenshot}")
            viewer.close()

    def next_run(*_args) -> None:
        while queue:
            layer, pack = queue.pop(0)
            widget.reset_choices()
            widget.image.value = layer
            widget.model.value = pack
            worker = widget.run()
            if worker is not None:
                worker.finished.connect(next_run)
                return
        from qtpy.QtCore import QTimer

        QTimer.singleShot(500, finish)

    from qtpy.QtCore import QTimer

    QTimer.singleShot(0, next_run)
    napari.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
