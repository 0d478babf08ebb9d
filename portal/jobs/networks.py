"""Network segments on servers, for the VM jobs: made before a domain is defined or started, removed
once the last VM using them on that server is gone."""

from __future__ import annotations

from .. import networks
from ..models import VM, Server
from ..vmm import netdev


def ensure_for(progress, session, vm: VM, server: Server | None = None) -> None:
    """Make every network of the VM exist on the server (idempotent)."""
    server = server or vm.server
    for seg in networks.segments_for(vm, server):
        if isinstance(seg, netdev.NatNetwork):
            netdev.ensure_nat(session, seg)
            progress.log(f"NAT network {seg.name} ({seg.gateway}) on {server.hostname} is ready.")
            continue
        how = netdev.ensure(session, seg)
        progress.log(f"Network bridge {seg.bridge} on {server.hostname}"
                     + (f" (VLAN {seg.vlan} as {how})" if seg.vlan is not None else "") + " is ready.")


def release_idle(progress, session, server: Server, *, besides: int | None = None) -> None:
    """Remove from the server every network segment no VM there uses any more (apart from VM *besides*)."""
    for net in networks.all_networks():
        if networks.still_used_on(net, server, besides=besides):
            continue
        seg = networks.segment(net, server)
        removed = netdev.release_nat(session, seg) if isinstance(seg, netdev.NatNetwork) else \
            netdev.release(session, seg)
        if removed:
            progress.log(f"Removed {net.name}'s bridge {net.bridge} from {server.hostname}: no VM there uses it.")
