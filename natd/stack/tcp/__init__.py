"""natd's TCP: every guest connection terminated and re-originated as a host socket.

The parts, each a module (no import goes back from a flow to the engine):

* ``engine``    — ``TcpEngine``: flows by key, handshakes without a flow, TIME-WAIT, timers,
  the memory budget's bookkeeping (the theory of operation is its docstring);
* ``flow``      — ``TcpFlow``: the per-flow state machine over its parts;
* ``sender`` / ``receiver`` — what moves bytes host → guest and guest → host;
* ``template``  — segments to the guest from a per-flow header template;
* ``sendbuf``   — the host → guest send buffer;
* ``tcb``       — the per-flow variables the parts share;
* ``port``      — ``Port``: the few things a flow may ask of its engine;
* ``constants`` — flags, states, timer bounds.
"""

from __future__ import annotations

from natd.stack.tcp.engine import TcpEngine, state_of

__all__ = ["TcpEngine", "state_of"]
