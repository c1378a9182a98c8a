"""Hosts simulated with Linux network namespaces (root only), for the PD tests and benchmarks:
each host is a namespace with its own address, linked to a hub namespace's bridge by a veth pair, so
traffic between hosts crosses real network interfaces. The hub holds the bridge's own address
(HUB_HOST: etcd and the router run there). Everything is deleted on close()."""

from __future__ import annotations

import os
import subprocess
import uuid


class NetnsUnavailable(RuntimeError):
    pass


def _ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise NetnsUnavailable(f"ip {' '.join(args)}: {r.stderr.strip()}")


class Hosts:
    def __init__(self, names: list[str], subnet: int | None = None) -> None:
        if os.geteuid() != 0:
            raise NetnsUnavailable("network namespaces need root")
        self.tag = uuid.uuid4().hex[:6]
        self.subnet = subnet if subnet is not None else 64 + int(self.tag, 16) % 128
        self.names = ["hub", *names]
        self.ns = {n: f"baton-{self.tag}-{n}" for n in self.names}
        self.addr = {n: f"10.77.{self.subnet}.{i + 1}" for i, n in enumerate(self.names)}
        self.created: list[str] = []
        try:
            self._create()
        except Exception:
            self.close()
            raise

    def _create(self) -> None:
        hub = self.ns["hub"]
        for n in self.names:
            _ip("netns", "add", self.ns[n])
            self.created.append(self.ns[n])
            _ip("-n", self.ns[n], "link", "set", "lo", "up")
        _ip("-n", hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", hub, "addr", "add", f"{self.addr['hub']}/24", "dev", "br0")
        _ip("-n", hub, "link", "set", "br0", "up")
        for i, n in enumerate(self.names[1:]):
            # created in the hub, one end then moved into the host (names are per namespace)
            _ip("-n", hub, "link", "add", f"v{i}", "type", "veth", "peer", "name", "eth0", "netns", self.ns[n])
            _ip("-n", hub, "link", "set", f"v{i}", "master", "br0")
            _ip("-n", hub, "link", "set", f"v{i}", "up")
            _ip("-n", self.ns[n], "addr", "add", f"{self.addr[n]}/24", "dev", "eth0")
            _ip("-n", self.ns[n], "link", "set", "eth0", "up")

    def run_in(self, name: str) -> list[str]:
        """The command prefix that runs a program on host `name`."""
        return ["ip", "netns", "exec", self.ns[name]]

    def close(self) -> None:
        for ns in reversed(self.created):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.created = []

    def __enter__(self) -> Hosts:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
