#!/bin/busybox sh
# natd test guest: PID 1 of the busybox initramfs that tests/vm/build_image.py packs.
# It brings up eth0 with DHCP, runs the checks the host test asks for on the kernel command line
# (natd.KEY=VALUE words), prints every result on the serial console as "NATDVM key=value" lines,
# and powers off. The host test decides pass/fail from those lines; this script only reports.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
mkdir -p /tmp /www

say() { echo "NATDVM $*" > /dev/console; }
fail() { say "error=$*"; say "done=1"; poweroff -f; }

# natd.KEY=VALUE words of the kernel command line become shell variables arg_KEY.
for word in $(cat /proc/cmdline); do
  case "$word" in
    natd.*=*) key=${word%%=*}; key=${key#natd.}; eval "arg_$key=\${word#*=}" ;;
  esac
done
say "boot=1"

for mod in $(cat /lib/modules/order); do
  insmod "/lib/modules/$mod.ko" || say "insmod_failed=$mod"
done
ip link set lo up
i=0
while [ ! -e /sys/class/net/eth0 ]; do
  i=$((i + 1)); [ $i -gt 100 ] && fail "no eth0"; usleep 100000
done

# DHCP: the -s script (tests/e2e/harness.py's) applies the lease and records what the server
# said in $OUT as key=value lines.
export OUT=/tmp/lease.env
udhcpc -i eth0 -s /udhcpc.sh -f -q -n -t 10 -T 2 -O mtu >/tmp/udhcpc.log 2>&1 || fail "udhcpc"
[ -f "$OUT" ] || fail "udhcpc never ran its script with bound"
while read -r line; do say "lease_$line"; done < "$OUT"
say "mtu_applied=$(cat /sys/class/net/eth0/mtu)"
say "addr=$(ip -4 -o addr show dev eth0 | awk '{print $4}')"

gw=${arg_gw:-10.0.2.2}

# A download from and an upload to http://$2 (HOST:PORT); keys prefixed with $1.
http_both() {
  if wget -q -O /tmp/down "http://$2/download"; then
    say "${1}download_sha256=$(sha256sum /tmp/down | cut -d' ' -f1)"
  else
    say "${1}download_sha256=failed"
  fi
  # Text, not raw bytes: busybox wget --post-file sends strlen() of the file, so a NUL ends it.
  dd if=/dev/urandom bs=1024 count="${arg_upkb:-768}" 2>/dev/null | base64 > /tmp/up
  say "${1}upload_sha256=$(sha256sum /tmp/up | cut -d' ' -f1)"
  if wget -q -O /tmp/upreply --post-file=/tmp/up "http://$2/upload"; then
    say "${1}upload_reply=$(cat /tmp/upreply)"
  else
    say "${1}upload_reply=failed"
  fi
}

# Ping, DNS, download and upload; every key is prefixed with $1 (empty the first time).
transfers() {
  p=$1
  if ping -c 1 -W 5 "$gw" >/dev/null 2>&1; then say "${p}ping=ok"; else say "${p}ping=fail"; fi
  # The biggest echo that fits the link's MTU unfragmented, both ways in one frame each.
  big=$(( $(cat /sys/class/net/eth0/mtu) - 28 ))
  if ping -c 1 -W 5 -s "$big" "$gw" >/dev/null 2>&1; then
    say "${p}bigping=$big"
  else
    say "${p}bigping=fail"
  fi
  if [ -n "$arg_dnsname" ]; then
    answer=$(nslookup "$arg_dnsname" "${arg_dns:-10.0.2.3}" 2>&1 \
      | awk '/^Name:/ {n=1} n && /^Address/ {print $NF; exit}')
    say "${p}dns=${answer:-none}"
  fi
  [ -n "$arg_http" ] || return 0
  http_both "$p" "$arg_http"
}

transfers ""

# natd.http6=[ADDR]:PORT: after the IPv4 checks, IPv6 from natd's Router Advertisement alone
# (the kernel's own SLAAC): a global address out of tentative, the default route via fe80::2,
# a ping of natd's gateway ::2, and a download and an upload through it to the host's [::1].
if [ -n "$arg_http6" ]; then
  i=0
  until v6=$(ip -6 -o addr show dev eth0 scope global | grep -v tentative | awk '{print $4}') \
      && [ -n "$v6" ]; do
    i=$((i + 1)); [ $i -gt 200 ] && fail "no SLAAC address"; usleep 100000
  done
  say "v6addr=$v6"
  i=0
  until via=$(ip -6 route show default | awk '/via/ {print $3; exit}') && [ -n "$via" ]; do
    i=$((i + 1)); [ $i -gt 100 ] && fail "no IPv6 default route"; usleep 100000
  done
  say "v6router=$via"
  gw6=${arg_http6%]:*}; gw6=${gw6#[}
  if ping -6 -c 1 -W 5 "$gw6" >/dev/null 2>&1; then say "v6ping=ok"; else say "v6ping=fail"; fi
  http_both v6 "$arg_http6"
fi

if [ -n "$arg_fwdport" ]; then
  dd if=/dev/urandom of=/www/fwd.bin bs=1024 count="${arg_fwdkb:-256}" 2>/dev/null
  say "forward_sha256=$(sha256sum /www/fwd.bin | cut -d' ' -f1)"
  httpd -p "$arg_fwdport" -h /www
  # httpd may daemonize before it binds: report ready only once the port listens.
  i=0
  until netstat -ltn | grep -q ":$arg_fwdport "; do
    i=$((i + 1)); [ $i -gt 100 ] && fail "httpd never listened on $arg_fwdport"; usleep 100000
  done
  say "forward=ready"
  # The host fetches through natd's forward, then answers /release; give up after a while.
  if [ -n "$arg_http" ]; then
    # (busybox 1.35's wget -T segfaults: bound it with timeout instead)
    timeout 150 wget -q -O /dev/null "http://$arg_http/release" || say "release=failed"
  fi
fi

# natd.again=1: the host restarts natd now; keep asking /again (through whichever natd is
# there) until it answers, then do every transfer again, without a new lease or link.
if [ -n "$arg_again" ]; then
  say "again=waiting"
  i=0
  until timeout 5 wget -q -O /dev/null "http://$arg_http/again" 2>/dev/null; do
    i=$((i + 1)); [ $i -gt 120 ] && fail "the host never answered /again"; sleep 1
  done
  transfers "again_"
fi

say "done=1"
poweroff -f
