"""recserve clients: ``from recserve.clients import RecommendClient, AsyncRecommendClient, ModelClient``."""

from recserve.clients.admin import ModelClient, ModelState, VersionState
from recserve.clients.recommend import AsyncRecommendClient, Recommendation, RecommendClient

__all__ = ["AsyncRecommendClient", "ModelClient", "ModelState", "Recommendation", "RecommendClient", "VersionState"]
