"""The session policy (see policy.py), split by concern: the gap model (gaps.py), stream and
tier state (streams.py), the ranking (ranking.py), the fallback to LRU (duel.py)."""

from kvstore.policy.session.gaps import CLASS_NAMES, GapModel
from kvstore.policy.session.policy import SessionPolicy

__all__ = ["CLASS_NAMES", "GapModel", "SessionPolicy"]
