"""recserve clients: ``from recserve.clients import RecommendClient, AsyncRecommendClient``."""

from recserve.clients.recommend import AsyncRecommendClient, Recommendation, RecommendClient

__all__ = ["AsyncRecommendClient", "Recommendation", "RecommendClient"]
