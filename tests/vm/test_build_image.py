"""The VM image builder's pure parts: module dependency order and the cache key (no root)."""

from __future__ import annotations

from pathlib import Path

import build_image
import pytest


def _ko(root: Path, name: str, depends: str) -> None:
    """A stand-in .ko: only the .modinfo strings the builder reads."""
    path = root / "kernel" / f"{name}.ko"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x7fELF junk\x00license=GPL\x00depends=" + depends.encode() + b"\x00x\x00")


def test_modules_load_dependencies_first(tmp_path: Path) -> None:
    # The shape of Debian 6.1's virtio-net over virtio-pci.
    _ko(tmp_path, "virtio", "")
    _ko(tmp_path, "virtio_ring", "virtio")
    _ko(tmp_path, "virtio_pci_modern_dev", "")
    _ko(tmp_path, "virtio_pci", "virtio_pci_modern_dev,virtio_ring,virtio")
    _ko(tmp_path, "failover", "")
    _ko(tmp_path, "net_failover", "failover")
    _ko(tmp_path, "virtio_net", "net_failover,virtio,virtio_ring")
    _ko(tmp_path, "unrelated", "")
    order = [
        ko.stem for ko in build_image.module_load_order(tmp_path, ("virtio_pci", "virtio_net"))
    ]
    assert sorted(order) == sorted(
        ["virtio", "virtio_ring", "virtio_pci_modern_dev", "virtio_pci", "failover",
         "net_failover", "virtio_net"]
    )  # fmt: skip
    for module, deps in [("virtio_pci", ["virtio_pci_modern_dev", "virtio_ring", "virtio"]),
                         ("virtio_net", ["net_failover", "virtio", "virtio_ring"]),
                         ("net_failover", ["failover"]), ("virtio_ring", ["virtio"])]:  # fmt: skip
        assert all(order.index(dep) < order.index(module) for dep in deps), order


def test_a_missing_module_is_a_clear_error(tmp_path: Path) -> None:
    _ko(tmp_path, "virtio_net", "net_failover")
    with pytest.raises(build_image.ImageUnavailable, match="net_failover"):
        build_image.module_load_order(tmp_path, ("virtio_net",))


def test_cache_key_names_versions_and_changes_with_them() -> None:
    key = build_image.cache_key(
        {"linux-image-6.1.0-57-amd64": "6.1.192-3", "busybox-static": "1:1.35"}
    )
    assert "linux-image-6.1.0-57-amd64_6.1.192-3" in key and "/" not in key and ":" not in key
    other = build_image.cache_key(
        {"linux-image-6.1.0-58-amd64": "6.1.193-1", "busybox-static": "1:1.35"}
    )
    assert other != key
