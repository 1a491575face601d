"""Market data: per-region feeds, JetStream-sourced views, top of book in Redis (decision 0003)."""

from replication.errors import QuoteRejected, ReplayError, ReplicationError
from replication.metrics import MdMetrics
from replication.simulator import Feed, QuoteSimulator, ReplaySource, read_ticks, record
from replication.topbook import TopBookConsumer, TopOfBook, TopQuote
from replication.view import VIEW_STREAM, ensure_view, view_sources

__all__ = [
    "VIEW_STREAM",
    "Feed",
    "MdMetrics",
    "QuoteRejected",
    "QuoteSimulator",
    "ReplayError",
    "ReplaySource",
    "ReplicationError",
    "TopBookConsumer",
    "TopOfBook",
    "TopQuote",
    "ensure_view",
    "read_ticks",
    "record",
    "view_sources",
]
