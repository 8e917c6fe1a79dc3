"""The one base class of the service's own errors.

Every error the service raises on purpose derives from ``NbaError`` (and, where callers already
catch it so, from the matching built-in such as ``ValueError``). Which gRPC status an error becomes
is decided in the serving layer, not here.
"""

from __future__ import annotations


class NbaError(Exception):
    """An error of the decision service: bad input, a refused rule or model file, a busy data dir."""

    # what a client program tells apart (google.rpc.ErrorInfo ``reason`` on the wire, UPPER_SNAKE_CASE):
    # set on a class or an instance; "" means one derived from the class name
    reason: str = ""
