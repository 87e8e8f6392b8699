"""Everything a router bundle renders to, in one call, and the digest the result should have live.

`render_router` returns the complete `iptables-restore` input plus every service config file by name,
and which services should run. The applier writes the files, loads the ruleset and reloads only the
services whose files changed (`SERVICE_FILES`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property

from backend.appliance.router import dnsmasq, haproxy, vpn
from backend.appliance.router.delta import render_delta
from backend.appliance.router.layout import RouterInterfaces, RouterPaths
from backend.appliance.router.live_digest import live_digest
from backend.appliance.router.netfilter import render_iptables
from backend.router.bundle import RouterBundle, changed_rule_ids
from backend.router.rules import DhcpEntry, DnsEntry, LoadBalancerRule, RemoteAccessVpn, Rule

SERVICE_FILES: Mapping[str, tuple[str, ...]] = {
    "dnsmasq": (dnsmasq.CONF, dnsmasq.DHCP_HOSTS, dnsmasq.HOSTS),
    "haproxy": (haproxy.CONF,),
    "vpn": vpn.FILES,
}


@dataclass(frozen=True)
class RenderedRouter:
    """A bundle rendered: iptables-restore input, config files by name, services that should run."""

    iptables: str
    files: Mapping[str, str]
    services: Mapping[str, bool]

    @cached_property
    def expected_live_digest(self) -> str:
        """The live digest a router has once exactly this is applied."""
        return live_digest(self.iptables, self.files)


def render_files(
    bundle: RouterBundle, ifs: RouterInterfaces | None = None, paths: RouterPaths | None = None
) -> dict[str, str]:
    """Every service config file, by name (see SERVICE_FILES)."""
    return {
        dnsmasq.CONF: dnsmasq.render_dnsmasq_conf(bundle, ifs, paths),
        dnsmasq.DHCP_HOSTS: dnsmasq.render_dhcp_hosts(bundle),
        dnsmasq.HOSTS: dnsmasq.render_hosts(bundle),
        haproxy.CONF: haproxy.render_haproxy(bundle),
        vpn.IPSEC_CONF: vpn.render_ipsec_conf(bundle),
        vpn.IPSEC_SECRETS: vpn.render_ipsec_secrets(bundle),
        vpn.XL2TPD_CONF: vpn.render_xl2tpd_conf(bundle, paths),
        vpn.PPP_OPTIONS: vpn.render_ppp_options(bundle),
        vpn.CHAP_SECRETS: vpn.render_chap_secrets(bundle),
    }


FILE_RULES: tuple[type[Rule], ...] = (DhcpEntry, DnsEntry, LoadBalancerRule, RemoteAccessVpn)
"""The rule types that config files are rendered from (the others are netfilter lines only)."""


def files_unchanged(old: RouterBundle, new: RouterBundle, changed: set[int] | None = None) -> bool:
    """Whether `new` renders to the same config files as `old`: the files read the network,
    the VPN users and rules of the FILE_RULES types, and none of those changed."""
    if (old.network, old.vpn_users) != (new.network, new.vpn_users):
        return False
    if new.change is not None and new.change.is_from(old):
        entries = [*new.change.before.values(), *new.change.after.values()]
        return not any(isinstance(e.rule, FILE_RULES) for e in entries)
    if changed is None:
        changed = changed_rule_ids(old, new)
    if not changed:
        return True
    rules = [r.rule for r in old.rules if r.id in changed]
    rules += [r.rule for r in new.rules if r.id in changed]
    return not any(isinstance(rule, FILE_RULES) for rule in rules)


def render_router(
    bundle: RouterBundle, ifs: RouterInterfaces | None = None, paths: RouterPaths | None = None
) -> RenderedRouter:
    """Render a bundle completely."""
    return RenderedRouter(
        iptables=render_iptables(bundle, ifs),
        files=render_files(bundle, ifs, paths),
        services={
            "dnsmasq": True,
            "haproxy": bool(bundle.rules_of(LoadBalancerRule)),
            "vpn": vpn.vpn_of(bundle) is not None,
        },
    )


__all__ = [
    "SERVICE_FILES",
    "RenderedRouter",
    "live_digest",
    "render_delta",
    "render_files",
    "render_iptables",
    "render_router",
]
