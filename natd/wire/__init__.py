"""natd.wire: parse and build the headers natd speaks. Pure functions, stdlib only.

(Theory of operation: filled in by the wire module owner.)
"""

from natd.wire.errors import Malformed

__all__ = ["Malformed"]
