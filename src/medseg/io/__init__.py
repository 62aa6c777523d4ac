"""Readers and writers. Everything returns numpy arrays; writes are atomic."""

from medseg.io.atomic import atomic_path, atomic_write_bytes, atomic_write_text
from medseg.io.dicom import DICOM_SUFFIXES, is_dicom, read_dicom
from medseg.io.video import VIDEO_SUFFIXES, read_video
from medseg.io.images import IMAGE_SUFFIXES, ImageData, describe_array, label_path, read_image, read_labels, stem_of, write_labels
from medseg.io.slides import SLIDE_SUFFIXES, Slide, is_slide, open_slide

__all__ = [
    "DICOM_SUFFIXES",
    "IMAGE_SUFFIXES",
    "VIDEO_SUFFIXES",
    "ImageData",
    "SLIDE_SUFFIXES",
    "Slide",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "describe_array",
    "is_slide",
    "is_dicom",
    "label_path",
    "open_slide",
    "read_dicom",
    "read_image",
    "read_labels",
    "read_video",
    "stem_of",
    "write_labels",
]
