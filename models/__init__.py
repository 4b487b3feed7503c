"""Network definitions, checkpoint loading, layer analysis and surgery (plain nn.Modules)."""
from models.registry import ARCHS, build_model

__all__ = ["ARCHS", "build_model"]
