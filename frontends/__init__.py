"""Frontends: capture a torch module as an ATen-level ``torch.fx`` graph with shapes."""
from .capture import CaptureError, Captured, capture

__all__ = ["CaptureError", "Captured", "capture"]
