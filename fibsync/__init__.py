"""fibsync: mirror the Linux FIB into eBPF maps read by an XDP fast path."""

__version__ = "0.1.0"
