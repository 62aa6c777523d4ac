"""Point-and-click segmentation: clicks, their encoding and simulation, the click session (with an
interactive pack or, for automatic packs, the fallback) and the number-of-clicks protocol."""

from medseg.interactive.clicks import Box, Click, parse_points
from medseg.interactive.session import ClickSession, segment_clicks

__all__ = ["Box", "Click", "ClickSession", "parse_points", "segment_clicks"]
