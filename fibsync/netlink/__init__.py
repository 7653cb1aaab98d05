"""rtnetlink in, model objects out.

- ``rtnl`` (rtnl.py): the one rtnetlink core: constants, header layouts,
  attributes, sockets, and ``Rtnl`` for blocking requests (XDP attach).
- ``NetlinkSource`` (source.py): subscribe, dump, stream, resync on overrun;
  feeds a ``Sink`` with one ``Snapshot`` per (re)dump and ordered change batches.
- ``decode.decode`` (decode.py): the struct-based decoder the source uses. It
  is not re-exported here: the name would shadow the ``decode`` module.
"""

from fibsync.netlink.source import NetlinkSource, Sink, SourceStats

__all__ = [
    "NetlinkSource",
    "Sink",
    "SourceStats",
]
