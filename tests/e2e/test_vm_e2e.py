"""A real Linux guest (Debian kernel, busybox initramfs, QEMU TCG) on natd over every link.

Each test boots the cached image (``tests/vm/build_image.py``) with one transport and asserts
what the guest's init reports on its serial console: the DHCP lease and its MTU applied, a ping
of the gateway, a DNS answer that only the test's loopback dnsmasq knows, a sha256-checked
download from and upload to an HTTP server on the host's loopback, and a forward from the host
into the guest's HTTP server. natd, dnsmasq, the HTTP server and QEMU all run inside a namespace
the test creates, so the guest can reach nothing else.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from harness import Natd, Netns
from vmguest import (
    FORWARD_PORT,
    GUEST_PORT,
    HostSide,
    Image,
    Vm,
    guest_args,
    image_or_reason,
    run_all_checks,
)

pytestmark = pytest.mark.vm

SOCKET_MTU = 65520
TAP_MTU = 1500


@pytest.fixture(scope="module")
def image() -> Image:
    image, reason = image_or_reason()
    if image is None:
        pytest.skip(reason)
    return image


class VmNet:
    """One test's namespace, host services, natd and VM, torn down together."""

    def __init__(self, ns: Netns, workdir: Path, image: Image, natd_process: Callable[..., Natd]):
        self.ns = ns
        self.workdir = workdir
        self.image = image
        self._natd_process = natd_process
        self.host = HostSide(ns, workdir)
        self.host.wait_dns_ready()
        self.vms: list[Vm] = []

    def natd(self, *link: str, **kw: object) -> Natd:
        return self._natd_process(
            [*link, "--dns-upstream", f"127.0.0.1:{self.host.dns_port}",
             "--forward", f"tcp:127.0.0.1:{FORWARD_PORT}-:{GUEST_PORT}"],
            netns_exec=self.ns, **kw,
        )  # fmt: skip

    def boot(self, netdev: str, pass_fds: tuple[int, ...] = ()) -> Vm:
        vm = Vm(
            self.image, netdev, self.workdir, cmdline=guest_args(self.host),
            prefix=self.ns.exec_prefix(), pass_fds=pass_fds,
        )  # fmt: skip
        self.vms.append(vm)
        return vm

    def check(self, vm: Vm, mtu: int) -> None:
        run_all_checks(vm, self.host, FORWARD_PORT, mtu)

    def close(self) -> None:
        for vm in self.vms:
            vm.close()
        self.host.close()


@pytest.fixture
def vmnet(
    image: Image, namespaces: Callable[..., Netns], natd_process: Callable[..., Natd],
    tmp_path: Path,
) -> Iterator[VmNet]:  # fmt: skip
    net = VmNet(namespaces(), tmp_path, image, natd_process)
    yield net
    net.close()


def test_vm_on_a_bridge_with_natds_tap(vmnet: VmNet) -> None:
    """QEMU's TAP and natd's TAP as two ports of a Linux bridge (vnet_hdr offloads on QEMU's)."""
    ns = vmnet.ns
    ns.run(["ip", "link", "add", "br0", "type", "bridge"])
    for tap in ("tnatd", "tvm"):
        ns.run(["ip", "tuntap", "add", tap, "mode", "tap"])
        ns.run(["ip", "link", "set", tap, "master", "br0"])
        ns.run(["ip", "link", "set", tap, "up"])
    ns.run(["ip", "link", "set", "br0", "up"])
    vmnet.natd("--tap", "tnatd")
    vm = vmnet.boot("tap,id=n0,ifname=tvm,script=no,downscript=no,vhost=off")
    vmnet.check(vm, TAP_MTU)
