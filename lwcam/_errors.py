"""The base error of every black box, in a module of its own.

:mod:`lwcam.blackbox` (the black box) and :mod:`lwcam._endpoint` (the inference-server client) both
raise it, and neither imports the other for it: the client stays importable without the black box,
and the black box imports the client only when a server is used (``BlackBox.from_endpoint``).
Its public name is ``lwcam.blackbox.BlackBoxError`` (also ``lwcam.BlackBoxError``).
"""

from __future__ import annotations

__all__ = ["BlackBoxError"]


class BlackBoxError(RuntimeError):
    """The wrapped callable returned an invalid answer, failed, or kept failing."""

    __module__ = "lwcam.blackbox"  # its public home: tracebacks and pickles name lwcam.blackbox.BlackBoxError
