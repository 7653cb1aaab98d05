"""Where the daemon's program runs, and where it may redirect to.

``Attachments`` keeps the configured interfaces running this instance's
program: all of them after the first sync, again when an interface comes back
(deleted and re-created), the difference on a reload. The tx ports (the
devmaps the program redirects through) follow: a previous run's ports that
this one does not attach are forbidden.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING, Any

from ..config import Settings
from ..errors import InterfaceError

if TYPE_CHECKING:
    from .program import Attachment, FastPath


def check_interfaces(names: tuple[str, ...]) -> list[int]:
    out = []
    for name in names:
        try:
            out.append(socket.if_nametoindex(name))
        except OSError:
            raise InterfaceError(
                f"interfaces: {name!r} does not exist in this network namespace "
                f"(see `ip link`; run fibsync inside the router's namespace)") from None
    return out


class Attachments:
    """The configured interfaces (``settings.interfaces``) and the program on them."""

    def __init__(self, fastpath: FastPath, settings: Settings, log: Any) -> None:
        self.fastpath = fastpath
        self.settings = settings
        self.log = log
        self.current: dict[str, Attachment] = {}
        self._failed: dict[str, str] = {}  # interface -> the last attach error logged

    def attach_all(self) -> None:
        for name in self.settings.interfaces:
            self.attach(name)
        configured = set(self.settings.interfaces)
        for att in self.fastpath.attached():
            if att.ifname not in configured:
                # a previous run's program on an interface no longer configured
                self.fastpath.detach(att.ifname)
                self.log.info("xdp.detach", interface=att.ifname, reason="not configured")

    def attach(self, name: str) -> None:
        att = self.fastpath.attach(name, mode=self.settings.xdp_mode,
                                   replace=self.settings.replace_xdp)
        self.current[name] = att
        self.log.info("xdp.attach", interface=name, mode=att.mode, prog_id=att.prog_id)

    def detach(self, name: str, reason: str) -> None:
        self.current.pop(name, None)
        try:
            self.fastpath.detach(name)
        except InterfaceError as e:
            # gone already: the kernel took the program with the interface
            self.log.info("xdp.detach", interface=name, reason=reason, note=str(e))
            return
        self.log.info("xdp.detach", interface=name, reason=reason)

    def prune_tx_ports(self) -> None:
        """Forget redirect targets a previous run allowed and this one does not."""
        keep = {a.ifindex for a in self.current.values()}
        for ifindex in self.fastpath.ports() - keep:
            self.fastpath.forbid_port(ifindex)

    def check(self) -> None:
        """Re-attach where a configured interface came back (deleted and re-created)."""
        current = {a.ifname: a for a in self.fastpath.attached(self.settings.interfaces)}
        for name in self.settings.interfaces:
            if name in current:
                self.current[name] = current[name]
                continue
            try:
                socket.if_nametoindex(name)
            except OSError:
                if self.current.pop(name, None) is not None:
                    self.log.warning("interface.gone", interface=name)
                continue
            try:
                self.attach(name)
            except InterfaceError as e:
                self.current.pop(name, None)
                if self._failed.get(name) != str(e):
                    self.log.error("xdp.attach_failed", interface=name, error=str(e))
                self._failed[name] = str(e)
            else:
                self._failed.pop(name, None)

    def reload(self, new: Settings) -> tuple[list[str], list[str]]:
        """Follow a new configuration: detach what it dropped, attach what it added (all
        of it when the XDP mode changed). Returns (added, removed)."""
        old, self.settings = self.settings, new
        added = [n for n in new.interfaces if n not in old.interfaces]
        removed = [n for n in old.interfaces if n not in new.interfaces]
        for name in removed:
            self.detach(name, reason="removed from the configuration")
        mode_changed = (new.xdp_mode, new.replace_xdp) != (old.xdp_mode, old.replace_xdp)
        for name in new.interfaces:
            if name in added or mode_changed:
                try:
                    self.attach(name)
                except InterfaceError as e:
                    self.log.error("xdp.attach_failed", interface=name, error=str(e))
        return added, removed

    def missing(self) -> list[str]:
        """Configured interfaces that run no program of ours."""
        return [n for n in self.settings.interfaces if n not in self.current]

    def doc(self) -> list[dict[str, Any]]:
        return [{"name": n, "ifindex": a.ifindex, "mode": a.mode, "prog_id": a.prog_id}
                for n, a in self.current.items()]
