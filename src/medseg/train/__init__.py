"""Training, evaluation and model packs. ``medseg.train.packs`` is import-light (no training code)."""
