"""Inference engines: the tiled Predictor (and, in their own modules, slides and clicks)."""

from medseg.engine.devices import resolve_device
from medseg.engine.predictor import PredictConfig, Prediction, Predictor, predict
from medseg.engine.progress import CancelToken, Progress, run_sync

__all__ = ["CancelToken", "PredictConfig", "Prediction", "Predictor", "Progress", "predict", "resolve_device", "run_sync"]
