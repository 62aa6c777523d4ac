"""The Correct dock: review a model's objects least sure first and fix them with a few keys.

Thin by design: every edit is a call on :class:`medseg.annotate.session.CorrectionSession`, which
applies it as a region diff, journals it (fsynced) and keeps undo/redo. The working copy *is* the
"corrected" Labels layer's array, so napari's own brush, eraser and fill work on it too; each stroke
is recorded as a diff when napari commits it. Fine-tuning runs off the GUI thread through
:class:`~napari_medseg._widgets._job.JobRunner`.

Keys (on the viewer and on the corrected layer): N next object, Shift-N previous, A accept,
R or Delete reject, G merge with the object shown before, S split (along the last line drawn in the
"cuts" layer, else by watershed), D redraw from the last polygon drawn in "cuts", H fill holes,
Ctrl-Z undo, Ctrl-Shift-Z redo. ``python -m napari_medseg._widgets.correct SESSION`` opens napari
with the dock on a session folder (what ``medseg correct`` runs).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from magicgui.widgets import ComboBox, Container, FileEdit, Label, LineEdit, ProgressBar, PushButton, SpinBox
from napari.layers import Image, Labels

from medseg.annotate.edits import Diff
from medseg.annotate.session import CorrectionSession
from medseg.errors import MedsegError
from napari_medseg._widgets._job import JobDock, JobRunner

if TYPE_CHECKING:
    import napari

CORRECTED = "corrected"
MODEL = "model (original)"
CUTS = "cuts"
KEYS = {
    "N": "next", "Shift-N": "previous", "A": "accept", "R": "reject", "Delete": "reject", "G": "merge", "S": "split",
    "D": "redraw", "H": "fill_holes", "Control-Z": "undo", "Control-Shift-Z": "redo",
}


def painted_diff(layer_data: np.ndarray, atoms: Sequence[Any]) -> Diff | None:
    """The region diff of one napari paint history item.

    napari emits the item before or after writing its last atom, so both patches are rebuilt from the
    atoms: the new one by applying them in order, the old one by reverting them in reverse order.
    """
    boxes = []
    for atom in atoms:
        if hasattr(atom, "slice_key"):
            sy, sx = atom.slice_key[-2:]
            boxes.append((sy.start, sx.start, sy.stop, sx.stop))
        else:
            idx = atom[0]
            if len(idx[-1]) == 0:
                continue
            boxes.append((int(idx[-2].min()), int(idx[-1].min()), int(idx[-2].max()) + 1, int(idx[-1].max()) + 1))
    if not boxes:
        return None
    y0, x0 = min(b[0] for b in boxes), min(b[1] for b in boxes)
    y1, x1 = max(b[2] for b in boxes), max(b[3] for b in boxes)
    region = np.array(layer_data[y0:y1, x0:x1], copy=True)
    new, old = region.copy(), region.copy()

    def put(target: np.ndarray, atom: Any, forward: bool) -> None:
        if hasattr(atom, "slice_key"):
            sy, sx = atom.slice_key[-2:]
            view = target[sy.start - y0 : sy.stop - y0, sx.start - x0 : sx.stop - x0]
            value = atom.new_value if forward else atom.old_values
            if atom.mask is None:
                view[...] = value
            else:
                view[atom.mask] = value
        else:
            idx, prev, nxt = atom
            target[idx[-2] - y0, idx[-1] - x0] = nxt if forward else prev

    for atom in atoms:
        put(new, atom, True)
    for atom in reversed(list(atoms)):
        put(old, atom, False)
    return Diff(y0, x0, old, new)


class CorrectWidget(JobDock, Container):
    """Review and correct predicted objects; export; fine-tune the pack on the corrections."""

    def __init__(self, napari_viewer: "napari.viewer.Viewer") -> None:
        super().__init__(labels=True)
        self._viewer = napari_viewer
        self.session: CorrectionSession | None = None
        self.layer: Labels | None = None
        self._syncing = False
        self._object_items: list[tuple[str, int]] | None = None  # what the object list shows (see _sync_object_list)

        self.folder = FileEdit(label="session", mode="d", tooltip="a correction session folder (made by 'medseg correct' or by Start)")
        self.open_button = PushButton(text="Open session")
        self.image = ComboBox(label="image", choices=self._image_choices, tooltip="for Start: the image to correct")
        self.mask = ComboBox(label="objects", choices=self._labels_choices, tooltip="for Start: the predicted objects (instance ids or a binary mask)")
        self.start_button = PushButton(text="Start session from layers")
        self.counts = Label(label="progress", value="no session")
        self.current = Label(label="object", value="")
        self.objects = ComboBox(label="objects", choices=self._object_choices, tooltip="the objects, least sure first: choose one to go to it")
        self.merge_with = SpinBox(label="merge with", min=0, max=2**31 - 1, value=0, tooltip="G merges the current object with this one (the object shown before, by default)")
        buttons = [("◀ prev", "previous"), ("next ▶", "next"), ("accept", "accept"), ("reject", "reject"), ("merge", "merge"),
                   ("split", "split"), ("redraw", "redraw"), ("fill holes", "fill_holes"), ("undo", "undo"), ("redo", "redo")]
        self.buttons = {}
        rows = []
        for k in range(0, len(buttons), 5):
            row = []
            for text, action in buttons[k : k + 5]:
                b = PushButton(text=text)
                b.changed.connect(lambda _v=None, a=action: self.act(a))
                self.buttons[action] = b
                row.append(b)
            rows.append(Container(widgets=row, layout="horizontal", labels=False))
        self.export_button = PushButton(text="Export (TIFF, GeoJSON, effort CSV, summary)")
        self.pack = ComboBox(label="fine-tune pack", choices=self._pack_choices)
        self.steps = SpinBox(label="steps", min=1, max=100000, value=50)
        self.held_out = LineEdit(label="validate on", value="", tooltip="held-out correction session folders (or a folder holding them), separated by ';': "
                                 "the fine-tuning validates and selects on them; empty = the pack's validation split")
        self.finetune_button = PushButton(text="Fine-tune on this session")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(label="", min=0, max=1, value=0)
        self.status = Label(label="", value="")
        self.status.native.setWordWrap(True)
        self.extend([self.folder, self.open_button, self.image, self.mask, self.start_button, self.counts, self.current, self.objects, self.merge_with, *rows,
                     self.export_button, self.pack, self.steps, self.held_out, Container(widgets=[self.finetune_button, self.cancel_button], layout="horizontal", labels=False),
                     self.progress, self.status])
        self.jobs = JobRunner(run_buttons=[self.finetune_button], cancel_button=self.cancel_button, bar=self.progress, status=self.status)
        self.open_button.changed.connect(lambda _v=None: self.open_folder(self.folder.value))
        self.start_button.changed.connect(self.start_from_layers)
        self.export_button.changed.connect(self.export)
        self.objects.changed.connect(self._on_object_chosen)
        self.finetune_button.changed.connect(self.finetune)
        self.cancel_button.changed.connect(lambda _v=None: self.jobs.cancel())
        for emitter in (napari_viewer.layers.events.inserted, napari_viewer.layers.events.removed):
            emitter.connect(self._reset_layer_choices)
        self._bind_keys(napari_viewer)
        self.native.destroyed.connect(lambda *_: self._close())

    # ------------------------------------------------------------------ choices
    def _image_choices(self, _w=None):
        return [(layer.name, layer) for layer in self._viewer.layers if isinstance(layer, Image)]

    def _labels_choices(self, _w=None):
        return [(layer.name, layer) for layer in self._viewer.layers if isinstance(layer, Labels) and layer is not self.layer]

    def _reset_layer_choices(self, _event=None) -> None:
        self._syncing = True  # new layers change the layer lists, never the current object
        try:
            self.reset_choices()
            self._object_items = self._object_choices()  # the object list was rebuilt with the rest
        finally:
            self._syncing = False

    def _object_choices(self, _w=None):
        s = self.session
        if s is None:
            return []
        return [(f"{i} · {s.objects[i].status} · {s.objects[i].confidence:.2f}", i) for i in s.order()]

    def _on_object_chosen(self, oid) -> None:
        s = self.session
        if s is None or oid is None or oid == s.current or self._syncing:
            return
        try:
            before = s.current
            s.goto(int(oid))
        except MedsegError as exc:
            self.jobs.report(str(exc), "error")
            return
        if before is not None:
            self.merge_with.value = before
        self._centre(int(oid))
        self._refresh_text()

    def _pack_choices(self, _w=None):
        from medseg.train.packs import available_packs

        return sorted(available_packs())

    # ------------------------------------------------------------------ sessions
    def open_folder(self, folder: str | Path) -> CorrectionSession | None:
        """Open (replay) a session folder and show its image, the model's mask and the working copy."""
        try:
            session = CorrectionSession.open(folder)
        except MedsegError as exc:
            self.jobs.report(str(exc), "error")
            return None
        image = None
        if session.info.get("image"):
            try:
                image = session.read_image()
            except MedsegError as exc:
                self.jobs.report(f"{exc} The mask is shown without it.", "info")
        self._show(session, image)
        return session

    def start_from_layers(self, _value=None) -> CorrectionSession | None:
        """Start a session from the chosen image and objects layers, in the folder under 'session'."""
        from medseg.annotate.sources import objects_of

        image, mask = self.image.value, self.mask.value
        folder = self.folder.value
        if image is None or mask is None or not str(folder) or str(folder) == ".":
            self.jobs.report("Choose the image layer, the objects layer and a new session folder, then Start.", "error")
            return None
        data = np.asarray(mask.data)
        if data.shape != np.asarray(image.data).shape[:2]:
            self.jobs.report(f"Layer '{mask.name}' is {data.shape} but '{image.name}' is {np.asarray(image.data).shape[:2]}: choose the objects of this image.", "error")
            return None
        try:
            labels = objects_of(data)
        except MedsegError as exc:
            self.jobs.report(str(exc), "error")
            return None
        source = getattr(image, "source", None)
        info = {"image": str(source.path) if source is not None and source.path else None, "region": None,
                "mpp": (image.metadata.get("medseg") or {}).get("mpp") if isinstance(image.metadata, dict) else None,
                "source": {"kind": "layer", "name": mask.name}}
        try:
            session = CorrectionSession.create(folder, labels, None, info)
        except MedsegError as exc:
            self.jobs.report(str(exc), "error")
            return None
        self._show(session, None)
        return session

    def _show(self, session: CorrectionSession, image: np.ndarray | None) -> None:
        self._close()
        viewer = self._viewer
        self.session = session
        self._object_items = None  # a new session: the object list is rebuilt
        self.folder.value = str(session.folder)
        for name in (CORRECTED, MODEL, CUTS):
            if name in viewer.layers:
                viewer.layers.remove(name)
        if image is not None:
            viewer.add_image(image, name=Path(session.info.get("image") or "image").stem, rgb=image.ndim == 3 and image.shape[-1] in (3, 4))
        model = viewer.add_labels(session.original, name=MODEL, visible=False, opacity=0.4)
        model.editable = False  # the model's mask is kept as it was
        self.layer = viewer.add_labels(session.labels, name=CORRECTED, opacity=0.5)
        viewer.add_shapes(name=CUTS, edge_color="yellow", edge_width=2, face_color="transparent", ndim=2)
        self.layer.events.paint.connect(self._on_paint)
        self._bind_keys(self.layer)
        viewer.layers.selection.active = self.layer
        if session.current is not None and session.current in session.objects:
            self._centre(session.current)
        self._refresh_text()

    def _close(self) -> None:
        if self.session is not None:
            self.session.close()
            self.session = None

    # ------------------------------------------------------------------ actions (buttons and keys)
    def _bind_keys(self, target) -> None:
        for key, action in KEYS.items():
            target.bind_key(key, (lambda _t=None, a=action: self.act(a)), overwrite=True)

    def act(self, action: str) -> None:
        """Run one review action on the current object; a refusal becomes one sentence, never a crash."""
        s = self.session
        if s is None:
            self.jobs.report("Open or start a correction session first.", "error")
            return
        try:
            changed = getattr(self, f"_do_{action}")(s)
        except MedsegError as exc:
            self.jobs.report(str(exc), "error")
            return
        if changed and self.layer is not None:
            self.layer.refresh()
        self._refresh_text()

    def _do_next(self, s: CorrectionSession, step: int = 1) -> bool:
        before = s.current
        oid = s.step_to(step)
        if oid is None:
            self.jobs.report("No objects left to review.")
            return False
        if before is not None and before != oid:
            self.merge_with.value = before
        self._centre(oid)
        return False

    def _do_previous(self, s: CorrectionSession) -> bool:
        return self._do_next(s, -1)

    def _do_accept(self, s: CorrectionSession) -> bool:
        s.accept()
        return False

    def _do_reject(self, s: CorrectionSession) -> bool:
        return s.reject() is not None

    def _do_merge(self, s: CorrectionSession) -> bool:
        other = int(self.merge_with.value)
        keep = s.target()
        return s.merge(keep, other) is not None

    def _last_shape(self, kinds: tuple[str, ...]) -> np.ndarray | None:
        if CUTS not in self._viewer.layers:
            return None
        cuts = self._viewer.layers[CUTS]
        for data, kind in zip(reversed(cuts.data), reversed(cuts.shape_type)):
            if kind in kinds:
                return np.asarray(data)[:, -2:]
        return None

    def _clear_cuts(self) -> None:
        if CUTS in self._viewer.layers:
            self._viewer.layers[CUTS].data = []

    def _do_split(self, s: CorrectionSession) -> bool:
        line = self._last_shape(("line", "path"))
        oid = s.target()
        step = s.split_line(oid, line) if line is not None else s.split_watershed(oid)
        self._clear_cuts()
        return step is not None

    def _do_redraw(self, s: CorrectionSession) -> bool:
        polygon = self._last_shape(("polygon", "rectangle", "ellipse"))
        if polygon is None:
            self.jobs.report("Draw the new outline as a polygon in the 'cuts' layer, then press D.", "error")
            return False
        step = s.redraw(s.target(), polygon)
        self._clear_cuts()
        return step is not None

    def _do_fill_holes(self, s: CorrectionSession) -> bool:
        return s.fill_holes() is not None

    def _do_undo(self, s: CorrectionSession) -> bool:
        if s.undo() is None:
            self.jobs.report("Nothing to undo.")
            return False
        return True

    def _do_redo(self, s: CorrectionSession) -> bool:
        if s.redo() is None:
            self.jobs.report("Nothing to redo.")
            return False
        return True

    def _on_paint(self, event) -> None:
        """napari committed a brush/eraser/fill stroke on the working copy: record it as a diff."""
        if self.session is None or self.layer is None:
            return
        diff = painted_diff(self.layer.data, event.value)
        if diff is None:
            return
        diff.apply(self.session.labels)  # the same values napari writes (it may not have yet)
        try:
            self.session.record_painted(diff)
        except MedsegError as exc:
            self.jobs.report(str(exc), "error")
        self._refresh_text()

    # ------------------------------------------------------------------ view
    def _centre(self, oid: int) -> None:
        s = self.session
        obj = s.objects.get(oid) if s else None
        if obj is None or obj.box is None:
            return
        y0, x0, y1, x1 = obj.box
        self._viewer.camera.center = ((y0 + y1) / 2.0, (x0 + x1) / 2.0)
        size = self._viewer.window._qt_viewer.canvas.size if hasattr(self._viewer, "window") else (512, 512)
        span = max(y1 - y0, x1 - x0, 16) * 3.0
        self._viewer.camera.zoom = max(min(size) / span, 1e-3)
        if self.layer is not None:
            self.layer.selected_label = oid

    def _refresh_text(self) -> None:
        s = self.session
        if s is None:
            self.counts.value = "no session"
            return
        c = s.counts()
        self.counts.value = (f"{c['reviewed']}/{c['total']} reviewed · {c['unreviewed']} unreviewed · {c['accepted']} accepted · "
                             f"{c['edited']} edited · {c['rejected']} rejected · {c['added']} added")
        obj = s.objects.get(s.current) if s.current is not None else None
        self.current.value = "" if obj is None else f"{obj.id}: {obj.status}, confidence {obj.confidence:.2f}, {obj.area} px"
        self.buttons["undo"].enabled = s.can_undo
        self.buttons["redo"].enabled = s.can_redo
        self._syncing = True  # the list follows the session without moving it
        try:
            self._sync_object_list()
            if s.current in s.objects:
                self.objects.value = s.current
        finally:
            self._syncing = False

    def _sync_object_list(self) -> None:
        """Bring the object list up to date by changing only the entries that changed.

        Rebuilding a Qt combo box costs about 150 ms for 2 500 entries and 3 s for 10 000 (it grows
        faster than the count), once per action; an action changes a few entries, so the texts that
        differ are rewritten and objects that appeared or went away are inserted or removed in place.
        A list that changed in many places (a new session) is rebuilt.
        """
        new = self._object_choices()
        old, combo = self._object_items, self.objects.native
        if old is None or combo.count() != len(old):
            self.objects.reset_choices()
            self._object_items = new
            return
        new_ids, old_ids = [i for _, i in new], [i for _, i in old]
        gone, came = set(old_ids) - set(new_ids), set(new_ids) - set(old_ids)
        if len(gone) + len(came) > 64 or [i for i in old_ids if i not in gone] != [i for i in new_ids if i not in came]:
            self.objects.reset_choices()
            self._object_items = new
            return
        for k in sorted((k for k, i in enumerate(old_ids) if i in gone), reverse=True):
            combo.removeItem(k)
        for k, (text, i) in enumerate(new):
            if i in came:
                combo.insertItem(k, text, i)
        by_id = dict((i, t) for t, i in old)
        for k, (text, i) in enumerate(new):
            if i not in came and by_id[i] != text:
                combo.setItemText(k, text)
        self._object_items = new

    # ------------------------------------------------------------------ outputs
    def export(self, _value=None) -> dict | None:
        from medseg.annotate.export import export, summary

        if self.session is None:
            self.jobs.report("Open or start a correction session first.", "error")
            return None
        try:
            written = export(self.session)
        except MedsegError as exc:
            self.jobs.report(str(exc), "error")
            return None
        s = summary(self.session)
        self.jobs.report(f"Exported to {self.session.folder}: {s['accepted_unchanged']} accepted, {s['edited']} edited, {s['rejected']} rejected, "
                         f"{s['added']} added; mean Dice model -> corrected {s['mean_dice_original_to_final']:.3f}.", "info")
        return written

    def finetune(self, _value=None):
        from medseg.annotate.finetune import finetune_iter

        if self.session is None or self.pack.value is None:
            self.jobs.report("Open a session and choose the pack to fine-tune.", "error")
            return None
        held_out = [p.strip() for p in self.held_out.value.split(";") if p.strip()]
        workdir = Path(self.session.folder).resolve().parent / "medseg-work"  # beside the annotator's images, not wherever napari started
        return self.jobs.start(finetune_iter, self.pack.value, [self.session.folder], steps=int(self.steps.value), val_sessions=held_out or None, workdir=workdir,
                               description=f"Fine-tuning {self.pack.value}", on_result=self._on_finetuned)

    def _on_finetuned(self, result) -> None:
        text = f"New pack version {result.version} in {result.pack_path}: validation loss on {result.validation} {result.val_loss_before:.4f} -> {result.val_loss_after:.4f}"
        if result.reference:
            text += f"; on the pack's validation split {result.reference['validation_loss_before']:.4f} -> {result.reference['validation_loss_after']:.4f}"
        self.jobs.report(text + ".", "info")


def main(argv: Sequence[str] | None = None) -> int:
    """Open napari with the Correct dock on a session folder."""
    import napari

    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m napari_medseg._widgets.correct SESSION_FOLDER", file=sys.stderr)
        return 2
    viewer = napari.Viewer(title=f"napari-medseg: correct {Path(args[0]).name}")
    _, widget = viewer.window.add_plugin_dock_widget("napari-medseg", "Correct")
    if widget.open_folder(args[0]) is None:
        print(f"medseg: error: {widget.jobs.last_message}", file=sys.stderr)
        viewer.close()
        return 1
    widget.act("next")
    napari.run()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
