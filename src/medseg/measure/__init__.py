"""Measurements on segmentations: intrapartum ultrasound biometry (AoP, HSD) and object tables."""

from medseg.measure.biometry import Biometry, aop_hsd, biometry_errors, outer_contours

__all__ = ["Biometry", "aop_hsd", "biometry_errors", "outer_contours"]
