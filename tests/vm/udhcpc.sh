#!/bin/sh
# udhcpc -s script of the test guest: apply the lease and report what the server said.
case "$1" in
  deconfig)
    ip -4 addr flush dev "$interface"
    ip link set "$interface" up
    ;;
  bound|renew)
    ip -4 addr flush dev "$interface"
    ip addr add "$ip/$subnet" dev "$interface"
    [ -n "$mtu" ] && ip link set dev "$interface" mtu "$mtu"
    if [ -n "$router" ]; then
      set -- $router
      ip route replace default via "$1" dev "$interface"
    fi
    {
      echo "NATDVM lease_ip=$ip"
      echo "NATDVM lease_router=$router"
      echo "NATDVM lease_dns=$dns"
      echo "NATDVM lease_mtu=$mtu"
    } > /dev/console
    ;;
esac
exit 0
