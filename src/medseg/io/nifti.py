"""NIfTI volumes (nibabel): read with their geometry, write label volumes on the input's grid, atomically.

Arrays stay in the file's voxel order ``(X, Y, Z)``; the affine maps voxel indices to scanner
millimetres and ``spacing`` is the voxel size along the three array axes. A label volume written with
the affine and header of its input lies exactly on the input in any viewer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import InputError
from medseg.io.atomic import atomic_path

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


@dataclass
class NiftiVolume:
    """A volume ``(X, Y, Z)`` with its voxel-to-world affine and voxel spacing (mm)."""

    array: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]
    path: Path | None = None
    header: Any = None  # the nibabel header, kept so written labels carry the same qform/sform codes
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def axis_codes(self) -> tuple[str, str, str]:
        """Nearest anatomical direction of each voxel axis, e.g. ('L', 'S', 'P')."""
        import nibabel as nib

        return tuple(nib.aff2axcodes(self.affine))  # type: ignore[return-value]


def read_nifti(path: str | os.PathLike) -> NiftiVolume:
    """Read a 2-D or 3-D NIfTI file (a 4-D file with one volume is accepted)."""
    import nibabel as nib

    path = Path(path)
    if not path.exists():
        raise InputError(f"'{path}' does not exist: check the path.")
    if path.is_dir():
        raise InputError(f"'{path}' is a folder, not a NIfTI file: give the .nii or .nii.gz files inside it.")
    try:
        image = nib.load(str(path))
        array = np.asanyarray(image.dataobj)
    except Exception as exc:  # nibabel raises several kinds for damaged or foreign files
        raise InputError(f"'{path.name}' is not a NIfTI file nibabel can read ({type(exc).__name__}: {exc}); give a .nii or .nii.gz volume.") from exc
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3:
        raise InputError(f"'{path.name}' has {array.ndim} dimensions {array.shape}: give one 3-D volume (one frame of a series).")
    zooms = tuple(float(z) for z in image.header.get_zooms()[:3])
    spacing = tuple(zooms + (1.0,) * (3 - len(zooms)))
    return NiftiVolume(array=array, affine=np.asarray(image.affine, dtype=np.float64), spacing=spacing, path=path, header=image.header,
                       metadata={"axis_codes": "".join(nib.aff2axcodes(image.affine))})


def write_nifti(path: str | os.PathLike, array: np.ndarray, affine: np.ndarray, header: Any = None) -> Path:
    """Write ``array`` (X, Y, Z) with ``affine`` (and the source's header fields) atomically; returns the path."""
    import nibabel as nib

    path = Path(path)
    if not is_nifti(path):
        raise InputError(f"'{path.name}' is not a NIfTI name: end it in .nii.gz or .nii.")
    array = np.asarray(array)
    hdr = header.copy() if header is not None else None
    image = nib.Nifti1Image(array, np.asarray(affine, dtype=np.float64), header=hdr)
    image.set_data_dtype(array.dtype)
    if hdr is not None:  # keep the source's codes: labels then overlay the source exactly
        qcode, scode = int(hdr["qform_code"]), int(hdr["sform_code"])
        if not (qcode or scode):
            qcode = 1  # a header without codes would drop the geometry
        image.set_qform(affine, code=qcode)
        image.set_sform(affine, code=scode)
    image.header["scl_slope"], image.header["scl_inter"] = 1.0, 0.0
    with atomic_path(path) as tmp:
        nib.save(image, str(tmp))
    return path


def same_grid(a: NiftiVolume, b: NiftiVolume, atol: float = 1e-3) -> bool:
    """Same array shape and (to ``atol`` mm) the same voxel-to-world affine."""
    return a.array.shape == b.array.shape and bool(np.allclose(a.affine, b.affine, atol=atol))


__all__ = ["NIFTI_SUFFIXES", "NiftiVolume", "is_nifti", "read_nifti", "same_grid", "write_nifti"]
