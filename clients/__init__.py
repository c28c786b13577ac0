"""recserve clients: ``from recserve.clients import RecommendClient, AsyncRecommendClient, ModelClient, FeatureClient``."""

from recserve.clients.admin import ModelClient, ModelState, VersionState
from recserve.clients.features import FeatureClient
from recserve.clients.recommend import AsyncRecommendClient, Recommendation, RecommendClient

__all__ = ["AsyncRecommendClient", "FeatureClient", "ModelClient", "ModelState", "Recommendation", "RecommendClient", "VersionState"]
