"""Live events for the feature store: their shape and validation.

    events = [Event("17850", "85123A", 1700000000, "click"), ("12583", "71053", 1700000005.2, "view")]
    checked = validate_events(events, now=time.time())   # EventError names index and field

An event is ``(user_id, item_id, timestamp, event_type)``: non-empty ids of at most 511
UTF-8 bytes (LMDB's key limit), a timestamp in unix seconds (int or float, floored; not
negative, not more than a day ahead of the store's clock), and one of ``EVENT_TYPES``.
Every event type appends to the user's recent items; the type is validated and kept for
later weighting. The server validates each RPC's events before merging RPCs into one
``FeatureStore.push_events`` call, so one bad request cannot fail the others.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import NamedTuple

import numpy as np

EVENT_TYPES = ("interaction", "view", "click", "add_to_cart", "purchase")
MAX_ID_BYTES = 511  # LMDB's compiled-in key limit
MAX_CLOCK_SKEW_S = 86_400  # an event may be at most this far in the future


class Event(NamedTuple):
    user_id: str
    item_id: str
    timestamp: float  # unix seconds
    event_type: str = "interaction"


class EventError(ValueError):
    """A bad live event; ``index`` is its position in the call, ``field`` the bad part."""

    def __init__(self, index: int, field: str, problem: str):
        super().__init__(f"event {index}: {field} {problem}")
        self.index, self.field = index, field


def validate_events(events: Iterable, now: float) -> list[tuple[str, str, int, str]]:
    """Check every event; raise EventError for the first bad one. Returns normalised
    ``(user_id, item_id, int timestamp, event_type)`` tuples."""
    horizon = now + MAX_CLOCK_SKEW_S
    out = []
    for i, e in enumerate(events):
        try:
            user_id, item_id, ts, kind = e
        except (TypeError, ValueError):
            raise EventError(i, "event", "must be (user_id, item_id, timestamp, event_type)") from None
        for name, value in (("user_id", user_id), ("item_id", item_id)):
            if not isinstance(value, str):
                raise EventError(i, name, f"must be a string, got {type(value).__name__}")
            if not value:
                raise EventError(i, name, "is empty")
            if len(value.encode()) > MAX_ID_BYTES:
                raise EventError(i, name, f"is longer than {MAX_ID_BYTES} bytes")
        if isinstance(ts, (bool, np.bool_)) or not isinstance(ts, (int, float, np.integer, np.floating)):
            raise EventError(i, "timestamp", f"must be unix seconds (a number), got {ts!r}")
        if not math.isfinite(ts) or ts < 0:
            raise EventError(i, "timestamp", f"{ts!r} is not a valid unix time")
        if ts > horizon:
            raise EventError(i, "timestamp", f"{ts!r} is more than {MAX_CLOCK_SKEW_S} s in the future")
        if not isinstance(kind, str) or kind not in EVENT_TYPES:
            raise EventError(i, "event_type", f"{kind!r} is not one of {', '.join(EVENT_TYPES)}")
        out.append((user_id, item_id, int(math.floor(ts)), kind))
    return out
