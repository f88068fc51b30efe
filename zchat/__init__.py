"""zchat: a multi-user chat broker and clients on ZeroMQ."""

__version__ = "0.1.0"
