"""Dock widgets, one module each. Imported lazily by the npe2 manifest."""
