"""Readers and writers. Everything returns numpy arrays; writes are atomic."""

from medseg.io.atomic import atomic_path, atomic_write_bytes, atomic_write_text
from medseg.io.images import IMAGE_SUFFIXES, ImageData, describe_array, label_path, read_image, read_labels, stem_of, write_labels

__all__ = [
    "IMAGE_SUFFIXES",
    "ImageData",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "describe_array",
    "label_path",
    "read_image",
    "read_labels",
    "stem_of",
    "write_labels",
]
