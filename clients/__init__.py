"""recserve clients, sync and asyncio, with typed results.

    from recserve.clients import RecommendClient, FeatureClient, ModelClient, ChannelOptions
    from recserve.clients import AsyncRecommendClient, AsyncFeatureClient, AsyncModelClient
"""

from recserve.clients.admin import AsyncModelClient, ModelClient, ModelState, VersionState
from recserve.clients.channel import ChannelOptions, make_channel
from recserve.clients.features import AsyncFeatureClient, FeatureClient
from recserve.clients.recommend import AsyncRecommendClient, Recommendation, RecommendClient

__all__ = ["AsyncFeatureClient", "AsyncModelClient", "AsyncRecommendClient", "ChannelOptions", "FeatureClient",
           "ModelClient", "ModelState", "Recommendation", "RecommendClient", "VersionState", "make_channel"]
