"""NIfTI volumes: the round trip keeps values, spacing and orientation; the napari reader gives aligned
layers with the voxel spacing as scale; bad files are one sentence."""

from __future__ import annotations

import numpy as np
import pytest

from medseg.errors import InputError
from medseg.io.nifti import read_nifti, same_grid, write_nifti
from tests.multiseq.packs import AFFINE, synthetic_volume


def test_round_trip_keeps_values_spacing_and_orientation(tmp_path):
    vol = synthetic_volume((30, 20, 4))
    path = write_nifti(tmp_path / "c0.nii.gz", vol, AFFINE)
    back = read_nifti(path)
    np.testing.assert_array_equal(back.array, vol)
    assert back.array.dtype == np.int16
    np.testing.assert_allclose(back.affine, AFFINE, atol=1e-5)
    np.testing.assert_allclose(back.spacing, np.linalg.norm(AFFINE[:3, :3], axis=0), rtol=1e-5)
    assert back.axis_codes == ("I", "L", "P") and back.metadata["axis_codes"] == "ILP"

    # labels written with the source's header land on the same grid, codes and all
    labels = (vol > 500).astype(np.uint16) * 2221
    out = write_nifti(tmp_path / "labels.nii.gz", labels, back.affine, back.header)
    again = read_nifti(out)
    assert same_grid(again, back) and again.axis_codes == back.axis_codes
    assert int(again.header["qform_code"]) == int(back.header["qform_code"])
    np.testing.assert_array_equal(again.array, labels)
    assert not list(tmp_path.glob(".*"))  # nothing half-written left behind


def test_real_myops_volume_keeps_its_geometry(tmp_path):
    from tests.conftest import data_dir

    src = data_dir("myops") / "subject_105" / "DE.nii.gz"
    vol = read_nifti(src)
    assert vol.array.shape[:2] == (256, 256) and vol.spacing[2] > 10
    back = read_nifti(write_nifti(tmp_path / "de.nii.gz", vol.array, vol.affine, vol.header))
    assert same_grid(back, vol) and back.spacing == pytest.approx(vol.spacing) and back.axis_codes == vol.axis_codes


@pytest.mark.parametrize("name, message", [("missing.nii.gz", "does not exist"), ("bad.nii.gz", "not a NIfTI file")])
def test_unreadable_files_are_one_sentence(tmp_path, name, message):
    if name == "bad.nii.gz":
        (tmp_path / name).write_bytes(b"not a volume")
    with pytest.raises(InputError, match=message) as err:
        read_nifti(tmp_path / name)
    assert "\n" not in str(err.value)


def test_writing_needs_a_nifti_name(tmp_path):
    with pytest.raises(InputError, match="NIfTI name"):
        write_nifti(tmp_path / "labels.png", np.zeros((2, 2, 1), np.uint8), np.eye(4))


def test_reader_contribution_opens_a_study_as_aligned_layers(tmp_path):
    from napari_medseg._nifti_io import from_layer_array, get_nifti_reader
    from tests.multiseq.packs import write_study

    paths = write_study(tmp_path / "study", shape=(30, 20, 4))
    assert get_nifti_reader(str(tmp_path / "image.png")) is None
    reader = get_nifti_reader(str(tmp_path / "study"))
    layers = reader(str(tmp_path / "study"))
    assert [kw["name"] for _, kw, _ in layers] == ["study/C0", "study/LGE", "study/T2"]
    sx, sy, sz = np.linalg.norm(AFFINE[:3, :3], axis=0)
    for data, kwargs, kind in layers:
        assert kind == "image" and data.shape == (4, 30, 20)
        np.testing.assert_allclose(kwargs["scale"], (sz, sx, sy), rtol=1e-5)
        np.testing.assert_allclose(kwargs["metadata"]["medseg"]["affine"], AFFINE, atol=1e-5)
    np.testing.assert_array_equal(from_layer_array(layers[0][0]), read_nifti(paths["C0"]).array)
    single = get_nifti_reader([str(paths["T2"])])([str(paths["T2"])])
    assert single[0][1]["name"] == "T2"


def test_reader_opens_label_maps_as_labels_layers(tmp_path):
    """A study folder's label map (MyoPS 'gd', '<name>_seg', ...) of integers opens as a Labels layer on the
    same grid; a float volume or an integer image with another name stays an image."""
    from napari_medseg._nifti_io import read_nifti_layers
    from tests.multiseq.packs import write_study

    write_study(tmp_path / "study", shape=(30, 20, 4))
    labels = np.zeros((30, 20, 4), np.uint16)
    labels[5:15, 5:10] = 500
    write_nifti(tmp_path / "study" / "gd.nii.gz", labels, AFFINE)
    write_nifti(tmp_path / "study" / "prob_seg.nii.gz", labels.astype(np.float32) / 500, AFFINE)
    layers = {kw["name"]: (data, kw, kind) for data, kw, kind in read_nifti_layers(str(tmp_path / "study"))}
    assert layers["study/gd"][2] == "labels" and set(np.unique(layers["study/gd"][0])) == {0, 500}
    assert layers["study/gd"][1]["scale"] == layers["study/C0"][1]["scale"]
    assert layers["study/prob_seg"][2] == "image"  # not integers: a probability map, shown as an image
    assert {layers[f"study/{s}"][2] for s in ("C0", "LGE", "T2")} == {"image"}  # int16 images, named as sequences
