"""fibsync's exceptions, one tree::

    FibsyncError                 anything fibsync raises on purpose
    ├── ConfigError              bad flag or config value (exit 2); names the key
    ├── UsageError               the command line itself is wrong (exit 2)
    ├── DecodeError              a netlink message we cannot decode (counted, skipped)
    ├── NetlinkError             the routing socket failed
    │   └── NetlinkOverrun       ENOBUFS or an interrupted dump: resync needed
    ├── FastPathError            building, loading or attaching the XDP program
    │   ├── InterfaceError       interface missing, or already running other XDP
    │   └── MapError             a map write failed
    │       └── MapFullError     E2BIG/ENOSPC: the map has no room
    └── DaemonError              talking to the daemon (status socket)
        ├── DaemonDown           no daemon listens on the socket
        └── DaemonSilent         one listens but does not answer (stopped, hung)

Every error a user can cause becomes one line on stderr and an exit code
(``exit_code``); every error the kernel can cause is counted in status.
"""

from __future__ import annotations


class FibsyncError(Exception):
    exit_code = 1


class ConfigError(FibsyncError):
    exit_code = 2

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


class UsageError(FibsyncError):
    exit_code = 2


class DecodeError(FibsyncError):
    pass


class NetlinkError(FibsyncError):
    pass


class NetlinkOverrun(NetlinkError):
    pass


class FastPathError(FibsyncError):
    pass


class InterfaceError(FastPathError):
    exit_code = 2


class MapError(FastPathError):
    """``errno`` is the kernel's answer; ``done`` how many entries of a batch went in."""

    errno: int = 0
    done: int = 0


class MapFullError(MapError):
    pass


class DaemonError(FibsyncError):
    pass


class DaemonDown(DaemonError):
    pass


class DaemonSilent(DaemonError):
    pass
