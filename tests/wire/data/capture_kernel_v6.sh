#!/bin/sh
# Regenerates the two captures in this directory from a real kernel and a real DHCPv6 client:
#   kernel_dad_rs.pcap  what Linux sends when a link comes up: MLDv2 reports (Hop-by-Hop Router
#                       Alert), DAD Neighbour Solicitations (with a nonce), Router Solicitations;
#   dhclient6.pcap      dhclient -6 -S (Information-request, DUID-LL) and dhclient -6 (Solicit
#                       with IA_NA, DUID-LLT); the UDP checksums are partial (veth offload).
# dhclient runs with -sf /bin/true: it must not touch the host's resolv.conf.
# Everything happens inside a namespace created here and deleted on exit. Run as root from
# this directory.
set -eu
ns=v6wcap$$
work=$(mktemp -d)
pids=""
ip netns add "$ns"
trap 'for p in $pids; do kill "$p" 2>/dev/null || true; done; ip netns del "$ns"; rm -rf "$work"' EXIT
in_ns() { ip netns exec "$ns" "$@"; }  # not for background jobs: $! must be the program

dump() {  # dump FILE FILTER: start tcpdump on v6wb and wait until it listens
    ip netns exec "$ns" tcpdump -U -n -i v6wb -w "$1" "$2" 2>"$work/$1.log" &
    last=$!
    pids="$pids $last"
    until grep -q listening "$work/$1.log"; do sleep 0.1; done
}

until_count() {  # until_count FILE PATTERN N: poll (bounded) until the capture has N matches
    for _ in $(seq 100); do
        [ "$(tcpdump -r "$1" -n 2>/dev/null | grep -c "$2")" -ge "$3" ] && return 0
        sleep 0.1
    done
}

in_ns ip link add v6wa type veth peer name v6wb
in_ns ip link set v6wa address 52:54:00:12:34:56
in_ns ip link set v6wb up
dump kernel_dad_rs.pcap ip6
in_ns ip link set v6wa up
until_count kernel_dad_rs.pcap 'router solicitation' 2
kill "$last"

dump dhclient6.pcap 'udp port 547'
ip netns exec "$ns" dhclient -6 -S -1 -d -sf /bin/true -lf "$work/l1" -pf "$work/p1" v6wa >"$work/o1" 2>&1 &
pids="$pids $!"
ip netns exec "$ns" dhclient -6 -1 -d -sf /bin/true -lf "$work/l2" -pf "$work/p2" v6wa >"$work/o2" 2>&1 &
pids="$pids $!"
until_count dhclient6.pcap dhcp6 2
