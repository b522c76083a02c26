"""The per-flow variables of natd's TCP, and the contract between the parts that use them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from natd.stack.tcp.constants import CONNECTING, INITIAL_RTO
from natd.stack.tcp.port import Port
from natd.stack.tcp.sendbuf import SendBuffer


class Tcb:
    """The variables of one guest connection (RFC 9293's TCB), shared by its parts.

    ``TcpFlow`` is this plus its parts as mixins (header template, sender, receiver, state
    machine), each ``__slots__ = ()``: one object, every field one attribute load away, and
    each part in a module of its own. The methods one part calls in another are declared
    below for the type checker only.
    """

    __slots__ = (
        "accepted",
        "ack_pending",
        "backoff",
        "bytes_to_guest",
        "bytes_to_host",
        "cwnd",
        "delack_at",
        "dirty",
        "dupacks",
        "eng",
        "epoch_at",
        "fin_acked",
        "fin_first",
        "fin_seq",
        "gmac",
        "guest_fin",
        "guest_ip",
        "guest_port",
        "gwmac",
        "high_rxt",
        "host_eof",
        "host_paused",
        "id",
        "in_recovery",
        "ip_base",
        "irs",
        "iss",
        "issued",
        "k_cubic",
        "ka_probes",
        "key",
        "last_rx",
        "log",
        "max_snd_wnd",
        "mss",
        "ooo_bytes",
        "ooo_data",
        "ooo_fin",
        "ooo_starts",
        "opened_at",
        "out_base",
        "prr_delivered",
        "prr_out",
        "pseudo",
        "pto_armed",
        "rack_lost",
        "rcv_adv",
        "rcv_nxt",
        "rcv_wscale",
        "rec_at",
        "recover",
        "recover_fs",
        "remote_ip",
        "remote_port",
        "rto",
        "rtt_at",
        "rtt_seq",
        "rttvar",
        "rtx_at",
        "rtx_count",
        "rtx_since",
        "rxt_log",
        "rxt_time",
        "sack_ok",
        "sack_seen",
        "sacked",
        "sched",
        "snd_max",
        "snd_nxt",
        "snd_una",
        "snd_wl1",
        "snd_wl2",
        "snd_wnd",
        "snd_wscale",
        "sndbuf",
        "srtt",
        "ssthresh",
        "state",
        "syn_packet",
        "target",
        "tlp_seq",
        "to_host",
        "w_est",
        "w_max",
        "zero_since",
    )

    def __init__(
        self,
        eng: Port[Any],
        flow_id: int,
        key: tuple[bytes, int, bytes, int],
        gmac: bytes,
        irs: int,
        iss: int,
        mss: int,
        wscale: int | None,
        window: int,
        target: tuple[bytes, int],
        syn_packet: bytes,
        log: Any,
        now: float,
    ) -> None:
        guest_ip, guest_port, remote_ip, remote_port = key
        self.eng = eng
        self.id = flow_id
        self.key = key
        self.guest_ip = guest_ip
        self.guest_port = guest_port
        self.remote_ip = remote_ip
        self.remote_port = remote_port
        self.target = target
        self.syn_packet = syn_packet
        self.log = log
        self.opened_at = now
        self.state = CONNECTING
        self.gmac = gmac
        self.gwmac = eng.gateway_mac
        self.init_template()
        # guest → host
        self.irs = irs
        self.rcv_nxt = irs + 1
        self.rcv_adv = self.rcv_nxt
        self.rcv_wscale = 0
        # Out-of-order ranges: sorted starts and their bytes, never overlapping or touching.
        self.ooo_starts: list[int] = []
        self.ooo_data: list[bytearray] = []
        self.ooo_bytes = 0
        self.ooo_fin = 0  # seq the guest's FIN takes, when it came out of order
        # SACK (RFC 2018), negotiated on the handshake: the starts of the latest out-of-order
        # segments, newest first (the first SACK block reports the most recent one, RFC 2018 4).
        self.sack_ok = False
        self.sack_seen: list[int] = []
        self.to_host: list[bytes | memoryview] = []
        self.issued = 0
        self.accepted = 0
        self.guest_fin = False
        self.ack_pending = False
        self.delack_at = 0.0  # a small segment's ACK waits until then for the host's reply
        self.dirty = False
        # host → guest
        self.iss = iss
        self.snd_una = iss
        self.snd_nxt = iss
        self.snd_max = iss  # highest seq ever sent: snd_nxt goes back to una after an RTO
        self.snd_wnd = window
        self.max_snd_wnd = window
        self.snd_wl1 = irs
        self.snd_wl2 = iss
        self.snd_wscale = 0
        self.mss = mss
        self.sndbuf = SendBuffer()
        self.host_eof = False
        self.host_paused = False
        self.fin_seq = 0
        self.fin_acked = False
        self.fin_first = False
        # congestion control (RFC 5681) and retransmission (RFC 6298)
        self.cwnd = 10 * mss  # RFC 6928
        self.ssthresh = 1 << 30
        self.dupacks = 0
        self.in_recovery = False
        self.recover = iss
        # CUBIC (RFC 9438, ``congestion``): the window before the last loss, the epoch's start
        # (0: none yet), K, and the Reno-friendly estimate W_est, all in bytes and seconds.
        self.w_max = self.w_est = 0
        self.epoch_at = self.k_cubic = 0.0
        # PRR (RFC 6937) in SACK recovery: bytes delivered and sent since it began, the flight
        # then (RecoverFS), and when it began (for ``tcp.recovery_us``).
        self.prr_delivered = self.prr_out = self.recover_fs = 0
        self.rec_at = 0.0
        # The SACK scoreboard (RFC 6675): the guest's SACKed ranges above snd_una, sorted,
        # merged, as (start, end); and HighRxt, the end of the last retransmission in recovery.
        self.sacked: list[tuple[int, int]] = []
        self.high_rxt = iss
        self.rxt_time = 0.0  # when recovery last resent a hole
        # Recovery's resends not yet known to have arrived: (start, end, snd_max when resent).
        # Data above that snd_max SACKed means the resend, sent before it, was lost too.
        self.rxt_log: list[tuple[int, int, int]] = []
        # Tail loss probe (RFC 8985 7): ``rtx_at`` is a probe timeout, not the RTO; the seq of
        # the probe in flight; the guest SACKed the probe above a hole: below it all is lost.
        self.pto_armed = False
        self.tlp_seq = 0
        self.rack_lost = 0
        self.srtt = 0.0
        self.rttvar = 0.0
        self.rto = INITIAL_RTO
        self.rtt_seq = 0
        self.rtt_at = 0.0
        self.rtx_at = 0.0
        self.rtx_count = 0
        self.rtx_since = 0.0
        self.backoff = 0
        self.zero_since = 0.0
        # liveness
        self.last_rx = now
        self.ka_probes = 0
        self.sched = float("inf")
        self.bytes_to_guest = 0
        self.bytes_to_host = 0
        if wscale is not None:
            self.snd_wscale = wscale
            self.rcv_wscale = eng.rcv_wscale

    if TYPE_CHECKING:  # the parts' methods each other calls (defined in the mixins)

        def init_template(self) -> None: ...
        def xmit(
            self, seq: int, flags: int, payload: bytes | bytearray | memoryview = b""
        ) -> None: ...
        def window_field(self) -> int: ...
        def send_ack(self) -> None: ...
        def sack_option(self) -> bytes: ...
        def output(self, now: float) -> None: ...
        def flush(self, now: float | None = None) -> None: ...
        def on_guest_fin(self, now: float) -> None: ...


__all__ = ["Tcb"]
