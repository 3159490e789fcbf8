"""Inference: fit images to the network (letterbox / sliding windows) and post-process its logits."""

from eomt.inference.predictor import InstancePredictor, PanopticPredictor, Predictor, SemanticPredictor

__all__ = ["InstancePredictor", "PanopticPredictor", "Predictor", "SemanticPredictor"]
