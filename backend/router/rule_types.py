"""The kinds of router rule (CloudStack's names). Kept apart from the database so the router
appliance, which runs inside the VR, needs nothing but the standard library to know them."""

from __future__ import annotations

import enum


class RuleType(enum.StrEnum):
    FIREWALL_INGRESS = "firewall-ingress"
    FIREWALL_EGRESS = "firewall-egress"
    PORT_FORWARD = "port-forward"
    STATIC_NAT = "static-nat"
    SOURCE_NAT = "source-nat"
    LOAD_BALANCER = "load-balancer"
    DHCP_ENTRY = "dhcp-entry"
    DNS_ENTRY = "dns-entry"
    REMOTE_ACCESS_VPN = "remote-access-vpn"
