"""DICOM (pydicom) and video (imageio + ffmpeg) reading through medseg.io.read_image and the plugin's
reader, plus the real PSFHS MetaImage samples. The DICOM and video files are written by the tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from medseg.errors import InputError
from medseg.io import IMAGE_SUFFIXES, read_image
from tests.conftest import data_dir

PSFHS_MHA_IDS = ["03744", "04510", "04856", "04950", "05060"]


def write_dicom(path: Path, pixels: np.ndarray, spacing=(0.2, 0.25), rgb: bool = False, frame_time_ms: float | None = 40.0,
                regions_cm: tuple[float, float] | None = None, photometric: str | None = None) -> Path:
    """A minimal valid DICOM file (uncompressed, explicit VR little endian), single- or multi-frame."""
    pytest.importorskip("pydicom", reason="DICOM reading needs pydicom")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, UltrasoundMultiFrameImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UltrasoundMultiFrameImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "US"
    ds.PatientName = "Test^Patient"
    multi = pixels.ndim == (4 if rgb else 3)
    frames = pixels.shape[0] if multi else 1
    h, w = pixels.shape[1:3] if multi else pixels.shape[:2]
    if multi:
        ds.NumberOfFrames = frames
    ds.Rows, ds.Columns = h, w
    ds.SamplesPerPixel = 3 if rgb else 1
    ds.PhotometricInterpretation = photometric or ("RGB" if rgb else "MONOCHROME2")
    if rgb:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = 8 * pixels.dtype.itemsize
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    if spacing is not None:
        ds.PixelSpacing = [str(s) for s in spacing]
    if frame_time_ms is not None and multi:
        ds.FrameTime = str(frame_time_ms)
    if regions_cm is not None:
        region = Dataset()
        region.PhysicalUnitsXDirection = 3
        region.PhysicalUnitsYDirection = 3
        region.PhysicalDeltaX = regions_cm[1]
        region.PhysicalDeltaY = regions_cm[0]
        ds.SequenceOfUltrasoundRegions = [region]
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture
def frames(rng) -> np.ndarray:
    return rng.integers(0, 256, (5, 48, 64), dtype=np.uint8)


# --------------------------------------------------------------------------- DICOM
def test_multi_frame_dicom_is_a_stack_with_pixel_spacing(tmp_path, frames):
    data = read_image(write_dicom(tmp_path / "loop.dcm", frames))
    assert data.is_stack and not data.rgb and data.array.shape == frames.shape
    np.testing.assert_array_equal(data.array, frames)  # uncompressed: exact pixels
    assert data.spacing == (0.2, 0.25)
    assert data.metadata["frames"] == 5 and data.metadata["fps"] == pytest.approx(25.0) and data.metadata["Modality"] == "US"
    assert not any("Patient" in k for k in data.metadata)  # nothing identifying is copied


def test_single_frame_16_bit_and_suffixless_dicom(tmp_path, rng):
    image = rng.integers(0, 4096, (40, 30), dtype=np.uint16)
    path = write_dicom(tmp_path / "IM0001", image, spacing=(0.5, 0.5))  # DICOMDIR exports often have no suffix
    data = read_image(path)
    assert not data.is_stack and data.array.shape == (40, 30) and data.array.dtype == np.uint16
    np.testing.assert_array_equal(data.array, image)
    assert data.spacing == (0.5, 0.5)


def test_rgb_dicom_and_ultrasound_region_calibration(tmp_path, rng):
    rgb = rng.integers(0, 256, (3, 20, 24, 3), dtype=np.uint8)
    data = read_image(write_dicom(tmp_path / "colour.dcm", rgb, spacing=None, rgb=True, regions_cm=(0.02, 0.025)))
    assert data.rgb and data.is_stack and data.array.shape == rgb.shape
    np.testing.assert_array_equal(data.array, rgb)
    assert data.spacing == pytest.approx((0.2, 0.25))  # cm per pixel in the region -> mm
    assert data.metadata["spacing_source"] == "SequenceOfUltrasoundRegions"


def test_monochrome1_is_inverted_so_bright_is_high(tmp_path):
    image = np.array([[0, 100], [200, 255]], np.uint8)
    data = read_image(write_dicom(tmp_path / "m1.dcm", image, photometric="MONOCHROME1"))
    np.testing.assert_array_equal(data.array, 255 - image)


def test_bad_dicom_files_are_input_errors(tmp_path, frames):
    pytest.importorskip("pydicom", reason="DICOM reading needs pydicom")
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00")
    with pytest.raises(InputError, match="broken.dcm"):
        read_image(broken)
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # a structured report: no pixels
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID, ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID
    ds.save_as(tmp_path / "report.dcm", enforce_file_format=True)
    with pytest.raises(InputError, match="without pixel data"):
        read_image(tmp_path / "report.dcm")


# --------------------------------------------------------------------------- video
def write_video(path: Path, frames: np.ndarray, fps: float = 10, **kwargs) -> Path:
    pytest.importorskip("imageio_ffmpeg", reason="video reading needs imageio-ffmpeg")
    import imageio.v3 as iio

    iio.imwrite(path, frames, plugin="FFMPEG", fps=fps, macro_block_size=16, **kwargs)
    return path


def psfhs_frames(n: int = 4) -> np.ndarray:
    import imageio.v3 as iio

    images = data_dir("psfhs") / "images"
    return np.stack([iio.imread(p) for p in sorted(images.glob("*.png"))[:n]])


def test_mp4_of_psfhs_frames_is_a_grey_time_stack(tmp_path):
    frames = psfhs_frames(4)
    data = read_image(write_video(tmp_path / "loop.mp4", frames, codec="libx264"))
    # lossy: shape, frame count and type are kept, pixel values only approximately
    assert data.is_stack and not data.rgb and data.array.shape == frames.shape and data.array.dtype == np.uint8
    assert data.metadata["frames"] == 4 and data.metadata["fps"] == pytest.approx(10) and data.metadata["grey"]
    assert np.abs(data.array.astype(int) - frames).mean() < 8
    assert data.spacing is None


def test_avi_and_colour_video(tmp_path, rng):
    grey = np.repeat(rng.integers(0, 256, (3, 32, 48, 1), dtype=np.uint8), 3, axis=-1)
    data = read_image(write_video(tmp_path / "clip.avi", grey, codec="mjpeg"))
    assert data.array.shape == (3, 32, 48) and not data.rgb
    colour = np.zeros((2, 32, 48, 3), np.uint8)
    colour[..., 0] = 200  # red
    data = read_image(write_video(tmp_path / "clip.mov", colour))
    assert data.rgb and data.array.shape == (2, 32, 48, 3) and data.array[..., 0].mean() > data.array[..., 2].mean() + 100


def test_bad_video_is_an_input_error(tmp_path):
    pytest.importorskip("imageio_ffmpeg", reason="video reading needs imageio-ffmpeg")
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"not a video at all" * 10)
    with pytest.raises(InputError, match="broken.mp4"):
        read_image(bad)


# --------------------------------------------------------------------------- real MetaImage samples
@pytest.mark.parametrize("psfhs_id", PSFHS_MHA_IDS)
def test_real_psfhs_metaimage_samples(psfhs_id):
    import imageio.v3 as iio

    root = data_dir("psfhs")
    image = read_image(root / "mha_samples" / "image_mha" / f"{psfhs_id}.mha")
    assert image.array.shape == (256, 256) and not image.is_stack and image.spacing is None  # spacing 1 is a placeholder
    np.testing.assert_array_equal(image.array, iio.imread(root / "images" / f"{psfhs_id}.png"))
    labels = read_image(root / "mha_samples" / "label_mha" / f"{psfhs_id}.mha")
    assert set(np.unique(labels.array)) == {0, 1, 2}


# --------------------------------------------------------------------------- the plugin's reader
def test_plugin_reader_opens_dicom_and_video_with_their_scale(tmp_path, frames):
    from napari_medseg._io import get_reader

    for suffix in (".dcm", ".dicom", ".avi", ".mp4", ".mov"):
        assert suffix in IMAGE_SUFFIXES
    dcm = write_dicom(tmp_path / "loop.dcm", frames)
    reader = get_reader(str(dcm))
    assert reader is not None
    (data, kwargs, kind), = reader(str(dcm))
    assert kind == "image" and data.shape == frames.shape and kwargs["scale"] == (1.0, 0.2, 0.25)
    assert kwargs["metadata"]["medseg"]["spacing_mm"] == (0.2, 0.25)
    video = write_video(tmp_path / "loop.mp4", np.repeat(frames[..., None], 3, -1))
    (data, kwargs, kind), = get_reader(str(video))(str(video))
    assert data.shape == frames.shape and "scale" not in kwargs and kwargs["metadata"]["medseg"]["is_stack"]


def test_ffmpeg_binary_ships_with_imageio_ffmpeg():
    imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg", reason="video reading needs imageio-ffmpeg")

    assert Path(imageio_ffmpeg.get_ffmpeg_exe()).exists() or shutil.which("ffmpeg")
