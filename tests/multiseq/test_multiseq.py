"""The multi-sequence core and ``medseg multiseq``: any subset of C0 / LGE / T2 runs, the label volume has
the input's geometry and MyoPS values, and bad studies are one clear sentence."""

from __future__ import annotations

import numpy as np
import pytest

from medseg.cli import main
from medseg.engine import run_sync
from medseg.errors import InputError
from medseg.io.nifti import read_nifti, write_nifti
from medseg.multiseq import load_study, segment_study_iter, study_from_arrays, write_label_volume
from tests.multiseq.packs import AFFINE, TINY_PACK, save_tiny_pack, synthetic_volume, write_study

MYOPS_VALUES = {0, 200, 500, 600, 1220, 2221}


@pytest.fixture
def tiny_pack(tmp_path_factory, monkeypatch):
    folder = tmp_path_factory.mktemp("packs")
    save_tiny_pack(folder)
    monkeypatch.setenv("MEDSEG_MODELS", str(folder))
    return TINY_PACK


@pytest.mark.parametrize("given", [("C0", "LGE", "T2"), ("LGE",), ("C0", "T2")])
def test_any_subset_gives_a_label_volume_on_the_input_grid(tmp_path, tiny_pack, given):
    paths = write_study(tmp_path / "study", shape=(40, 36, 2))
    study = load_study({s: paths[s] for s in given})
    result = run_sync(segment_study_iter(study, tiny_pack))
    assert result.used == list(given) and result.labels.shape == (40, 36, 2) and result.labels.dtype == np.uint16
    assert set(np.unique(result.labels)) <= MYOPS_VALUES
    assert set(result.weights) == set(given) and sum(result.weights.values()) == pytest.approx(1.0, abs=1e-5)
    assert all(s in result.notice() for s in given)
    out = read_nifti(write_label_volume(tmp_path / "labels.nii.gz", result, study))
    np.testing.assert_allclose(out.affine, AFFINE, atol=1e-5)
    np.testing.assert_array_equal(out.array, result.labels)


def test_absent_sequences_change_nothing_in_the_output(tiny_pack):
    c0, lge = synthetic_volume((40, 36, 2), 0), synthetic_volume((40, 36, 2), 1)
    a = run_sync(segment_study_iter(study_from_arrays({"C0": c0, "LGE": lge}), tiny_pack))
    b = run_sync(segment_study_iter(study_from_arrays({"C0": c0, "LGE": lge, "T2": None}), tiny_pack))
    np.testing.assert_array_equal(a.labels, b.labels)


def test_flip_averaging_uses_the_packs_training_flips(tmp_path, monkeypatch):
    """--tta averages the slice with its mirror images only when the pack was trained with flips; the
    average over all mirror images is itself mirror-symmetric: a mirrored study gives the mirrored labels."""
    from tests.multiseq.packs import save_tiny_pack

    save_tiny_pack(tmp_path, "tiny-flips", augmentation={"hflip": True, "vflip": True})
    save_tiny_pack(tmp_path, "tiny-plain")
    monkeypatch.setenv("MEDSEG_MODELS", str(tmp_path))
    vols = {"C0": synthetic_volume((40, 36, 2), 0), "LGE": synthetic_volume((40, 36, 2), 1)}
    vols["LGE"][5:15, 3:12] += 600  # something off-centre, so that mirroring changes the input
    plain = run_sync(segment_study_iter(study_from_arrays(vols), "tiny-plain"))
    same = run_sync(segment_study_iter(study_from_arrays(vols), "tiny-plain", tta=True))
    assert same.flips == 0 and "mirror" not in same.notice()
    np.testing.assert_array_equal(plain.labels, same.labels)  # trained without flips: nothing to average
    averaged = run_sync(segment_study_iter(study_from_arrays(vols), "tiny-flips", tta=True))
    assert averaged.flips == 3 and "averaged over 4 mirror images" in averaged.notice()
    assert sum(averaged.weights.values()) == pytest.approx(1.0, abs=1e-5)
    mirrored = run_sync(segment_study_iter(study_from_arrays({s: v[::-1] for s, v in vols.items()}), "tiny-flips", tta=True))
    assert np.mean(mirrored.labels[::-1] == averaged.labels) > 0.999
    once = run_sync(segment_study_iter(study_from_arrays({s: v[::-1] for s, v in vols.items()}), "tiny-flips"))
    assert np.mean(once.labels[::-1] != run_sync(segment_study_iter(study_from_arrays(vols), "tiny-flips")).labels) > 0  # untrained: not symmetric by itself


def test_mismatched_geometry_and_no_sequence_are_one_sentence(tmp_path):
    paths = write_study(tmp_path / "a", shape=(40, 36, 2))
    other = write_nifti(tmp_path / "t2_shape.nii.gz", synthetic_volume((40, 36, 3)), AFFINE)
    moved = AFFINE.copy()
    moved[0, 3] += 5.0
    shifted = write_nifti(tmp_path / "t2_moved.nii.gz", synthetic_volume((40, 36, 2)), moved)
    for t2, message in ((other, "has shape"), (shifted, "different grids")):
        with pytest.raises(InputError, match=message) as err:
            load_study({"C0": paths["C0"], "T2": t2})
        assert "one grid" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(InputError, match="No sequence given"):
        load_study({"C0": None, "LGE": None, "T2": None})
    with pytest.raises(InputError, match="different voxel spacings"):
        study_from_arrays({"C0": np.ones((4, 4, 1)), "LGE": np.ones((4, 4, 1))}, {"C0": (1, 1, 8), "LGE": (1, 1, 10)})


def test_cli_refuses_bad_studies_with_one_line(tmp_path, tiny_pack, capsys):
    paths = write_study(tmp_path / "a", shape=(40, 36, 2))
    bad = write_nifti(tmp_path / "t2.nii.gz", synthetic_volume((40, 30, 2)), AFFINE)
    assert main(["multiseq", "--model", tiny_pack, "--c0", str(paths["C0"]), "--t2", str(bad), "-o", str(tmp_path / "o.nii.gz")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "share one grid" in err
    assert main(["multiseq", "--model", tiny_pack, "-o", str(tmp_path / "o.nii.gz")]) == 1
    assert "No sequence given" in capsys.readouterr().err
    assert not (tmp_path / "o.nii.gz").exists()


def test_cli_end_to_end_on_a_real_subject(tmp_path, capsys):
    """The shipped pack on a validation subject (never seen in training): geometry kept, sensible blood pools."""
    from medseg.metrics import dice
    from tests.conftest import data_dir

    subject = data_dir("myops") / "subject_110"
    from medseg.train.packs import available_packs

    if "cardiac-myops" not in available_packs(kind="multisequence"):
        pytest.skip("the cardiac-myops pack is not installed (resources/packs/cardiac-myops)")
    out = tmp_path / "labels.nii.gz"
    code = main(["multiseq", "--model", "cardiac-myops", "--c0", str(subject / "C0.nii.gz"), "--lge", str(subject / "DE.nii.gz"),
                 "--t2", str(subject / "T2.nii.gz"), "-o", str(out), "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    assert "all three" in capsys.readouterr().err
    pred, ref = read_nifti(out), read_nifti(subject / "gd.nii.gz")
    np.testing.assert_allclose(pred.affine, ref.affine, atol=1e-5)
    assert pred.array.shape == ref.array.shape and set(np.unique(pred.array)) <= MYOPS_VALUES
    assert dice(pred.array == 500, ref.array == 500) > 0.8
    myocardium = (200, 1220, 2221)
    assert dice(np.isin(pred.array, myocardium), np.isin(ref.array, myocardium)) > 0.75
    assert dice(np.isin(pred.array, (1220, 2221)), np.isin(ref.array, (1220, 2221))) > 0.5  # scar + oedema
    # one sequence only (LGE) still runs and still finds the LV blood pool
    code = main(["multiseq", "--model", "cardiac-myops", "--lge", str(subject / "DE.nii.gz"), "-o", str(out), "--device", "cpu"])
    assert code == 0 and "C0, T2 absent" in capsys.readouterr().err
    assert dice(read_nifti(out).array == 500, ref.array == 500) > 0.7
    # flip averaging: the shipped pack was trained with flips, so --tta averages 4 mirror images
    code = main(["multiseq", "--model", "cardiac-myops", "--lge", str(subject / "DE.nii.gz"), "-o", str(out), "--device", "cpu", "--tta"])
    assert code == 0 and "averaged over 4 mirror images" in capsys.readouterr().err
    assert dice(read_nifti(out).array == 500, ref.array == 500) > 0.7


def test_single_image_predictor_refuses_a_multi_sequence_pack(tiny_pack):
    from medseg.engine import Predictor
    from medseg.errors import ModelError
    from medseg.train.packs import load_pack

    with pytest.raises(ModelError, match="medseg multiseq"):
        Predictor(load_pack(tiny_pack))
