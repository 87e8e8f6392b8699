"""Router renderers: a bundle becomes iptables-restore input, dnsmasq, haproxy and strongSwan configs.

Golden snippets pin the key lines; where the machine allows, real tools check the output:
`iptables-restore --test` (and a real restore + iptables-save round trip) in a fresh network
namespace when running as root, `haproxy -c` and `dnsmasq --test` when installed.
"""

from __future__ import annotations

import base64
import copy
import functools
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from backend.appliance.router.delta import diff_rulesets, render_delta
from backend.appliance.router.layout import RouterInterfaces, RouterPaths
from backend.appliance.router.live_digest import canonical_netfilter, live_digest
from backend.appliance.router.netfilter import render_iptables, render_ruleset
from backend.appliance.router.render import SERVICE_FILES, render_router
from backend.errors import InvalidInput
from backend.router.bundle import BundleNetwork, RouterAddresses, RouterBundle
from tests.netns_host import netns_problem
from tests.test_router_rules import CIDR, GATEWAY, PUBLIC, VALID, VALID_USER, make_bundle

# ---------------------------------------------------------------- helpers


def chain_lines(text: str, chain: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(f"-A {chain} ")]


def bundle_with(rules: list[tuple[int, str, dict[str, Any]]], **kw: Any) -> RouterBundle:
    return RouterBundle.create(
        version=kw.pop("version", 1),
        network=BundleNetwork("net-1", CIDR, GATEWAY, 100, "net-1.cloud.internal", ("192.0.2.53",)),
        addresses=RouterAddresses("169.254.3.4", GATEWAY, tuple(sorted(PUBLIC))),
        rules=rules,
        **kw,
    )


def pppd_words(line: str) -> list[str]:
    """Split a chap-secrets line the way pppd's getword does (quotes, backslash escapes)."""
    words: list[str] = []
    i = 0
    while i < len(line):
        if line[i] in " \t":
            i += 1
            continue
        word = ""
        if line[i] == '"':
            i += 1
            while line[i] != '"':
                if line[i] == "\\":
                    i += 1
                word += line[i]
                i += 1
            i += 1
        else:
            while i < len(line) and line[i] not in " \t":
                word += line[i]
                i += 1
        words.append(word)
    return words


def assert_free_text_is_contained(
    rule_type: str, path: str, accepted: dict[str, Any], raw: dict[str, Any]
) -> None:
    """A legal free-text value (PSK, password, health-check path) changes only its own line."""
    if rule_type == "vpn-user":
        vpn = VALID["remote-access-vpn"]
        base = bundle_with([(1, "remote-access-vpn", vpn)], vpn_users=[VALID_USER])
        mine = bundle_with([(1, "remote-access-vpn", vpn)], vpn_users=[accepted])
    else:
        base = bundle_with([(1, rule_type, VALID[rule_type])])
        mine = bundle_with([(1, rule_type, raw)])
    before, after = render_router(base), render_router(mine)
    assert after.iptables == before.iptables
    for name, text in after.files.items():
        assert "\x00" not in text and "\r" not in text
        assert len(text.splitlines()) == len(before.files[name].splitlines()), name
        changed = [
            (old, new)
            for old, new in zip(before.files[name].splitlines(), text.splitlines(), strict=True)
            if old != new
        ]
        assert len(changed) <= 1, (name, changed)
    if path == "psk":
        (secret_line,) = [
            line for line in after.files["ipsec.secrets"].splitlines() if " : PSK " in line
        ]
        encoded = secret_line.split(" : PSK 0s", 1)[1]
        assert re.fullmatch(r"[A-Za-z0-9+/=]+", encoded)
        assert base64.b64decode(encoded).decode() == accepted["psk"]
    elif path in ("password", "username"):
        (user_line,) = [
            line for line in after.files["chap-secrets"].splitlines() if not line.startswith("#")
        ]
        assert pppd_words(user_line) == [accepted["username"], "*", accepted["password"], "*"]
    elif path == "health_check.path":
        checks = [line for line in after.files["haproxy.cfg"].splitlines() if "httpchk" in line]
        assert checks == [f"    option httpchk GET {accepted['health_check']['path']}"]
        assert len(checks[0].split()) == 4


# ---------------------------------------------------------------- iptables: golden lines


def test_full_ruleset_golden_lines() -> None:
    text = render_iptables(make_bundle())
    assert text.startswith(
        "*filter\n:INPUT DROP [0:0]\n:FORWARD DROP [0:0]\n:OUTPUT ACCEPT [0:0]\n"
    )
    assert text.count("COMMIT") == 3
    assert chain_lines(text, "INPUT") == ["-A INPUT -j SYSVM_INPUT"]
    assert chain_lines(text, "SYSVM_INPUT")[0] == (
        "-A SYSVM_INPUT -s 169.254.0.0/16 -i eth0 -p tcp -m tcp --dport 3922 -j ACCEPT"
    )
    assert chain_lines(text, "PREROUTING") == [
        "-A PREROUTING -j SYSVM_DNAT",
        "-A PREROUTING -i eth2 -j SYSVM_FW_INGRESS",
    ]
    expected = [
        # firewall-ingress (rule 4): one line per source CIDR, filtered before DNAT in mangle
        "-A SYSVM_FWI_04 -s 192.0.2.7/32 -d 203.0.113.5/32 -p tcp -m tcp --dport 22:23 -j ACCEPT",
        "-A SYSVM_FWI_04 -s 198.51.100.0/24 -d 203.0.113.5/32 -p tcp -m tcp --dport 22:23 -j ACCEPT",
        "-A SYSVM_FW_INGRESS -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        "-A SYSVM_FW_INGRESS -j DROP",
        # port-forward (rule 6): DNAT, and its public port opened (open_firewall)
        "-A SYSVM_DNAT_06 -d 203.0.113.5/32 -p tcp -m tcp --dport 8080 -j DNAT --to-destination 10.1.1.10:80",
        "-A SYSVM_FWI_06 -d 203.0.113.5/32 -p tcp -m tcp --dport 8080 -j ACCEPT",
        # hairpin NAT: guest -> public IP -> guest leaves with the gateway as source
        "-A SYSVM_SNAT -s 10.1.1.0/24 -d 10.1.1.0/24 -o eth1 -m conntrack --ctstate DNAT -j SNAT --to-source 10.1.1.1",
        "-A SYSVM_FORWARD -i eth1 -o eth1 -j ACCEPT",
        "-A SYSVM_FORWARD -i eth2 -o eth1 -m conntrack --ctstate DNAT -j ACCEPT",
        # static NAT (rule 9): 1:1 both ways
        "-A SYSVM_DNAT_09 -d 203.0.113.6/32 -j DNAT --to-destination 10.1.1.20",
        "-A SYSVM_SNAT_09 -s 10.1.1.20/32 -o eth2 -j SNAT --to-source 203.0.113.6",
        # source NAT (rule 8)
        "-A SYSVM_SNAT -s 10.1.1.0/24 -o eth2 -j SNAT --to-source 203.0.113.5",
        # egress (rule 3) under default deny: rules allow, the head's default drops
        "-A SYSVM_FWE_03 -s 10.1.1.0/25 -d 198.51.100.0/24 -p udp -m multiport --dports 53 -j ACCEPT",
        "-A SYSVM_FORWARD -i eth1 -o eth2 -j SYSVM_FW_EGRESS",
        # load balancer (rule 5): haproxy's port on the router; open_firewall is false here
        "-A SYSVM_IN_05 -d 203.0.113.7/32 -p tcp -m tcp --dport 80 -j ACCEPT",
        # remote-access VPN (rule 7)
        "-A SYSVM_FWI_07 -d 203.0.113.5/32 -p udp -m policy --dir in --pol ipsec -m multiport --dports 1701 -j ACCEPT",
        "-A SYSVM_FWD_07 -i ppp+ -o eth1 -m iprange --src-range 10.1.2.2-10.1.2.8 -j ACCEPT",
    ]
    lines = set(text.splitlines())
    for line in expected:
        assert line in lines, line
    assert chain_lines(text, "SYSVM_FW_EGRESS")[-1] == "-A SYSVM_FW_EGRESS -j DROP"
    snat = chain_lines(text, "SYSVM_SNAT")
    assert snat[-1].endswith("--to-source 203.0.113.5")  # source NAT after static NAT
    assert snat.index("-A SYSVM_SNAT -j SYSVM_SNAT_09") < len(snat) - 1
    assert "SYSVM_FWI_05" not in text  # LB with open_firewall false opens nothing in the firewall
    assert "dhcp" not in text.lower() and "db.example.org" not in text


def test_icmp_rules_and_egress_under_default_allow() -> None:
    text = render_iptables(
        bundle_with(
            [
                (
                    1,
                    "firewall-ingress",
                    {"public_ip": "203.0.113.6", "protocol": "icmp", "icmp_type": 8},
                ),
                (
                    2,
                    "firewall-ingress",
                    {
                        "public_ip": "203.0.113.6",
                        "protocol": "icmp",
                        "icmp_type": 3,
                        "icmp_code": 4,
                    },
                ),
                (3, "firewall-ingress", {"public_ip": "203.0.113.6", "protocol": "icmp"}),
                (4, "firewall-egress", {"protocol": "tcp", "start_port": 25}),
            ]
        )
    )
    assert "-A SYSVM_FWI_01 -d 203.0.113.6/32 -p icmp -m icmp --icmp-type 8 -j ACCEPT" in text
    assert "--icmp-type 3/4 " in text
    assert "-A SYSVM_FWI_03 -d 203.0.113.6/32 -p icmp -j ACCEPT" in text
    assert "-A SYSVM_FWE_04 -s 10.1.1.0/24 -p tcp -m tcp --dport 25 -j DROP" in text
    assert chain_lines(text, "SYSVM_FW_EGRESS")[-1] == "-A SYSVM_FW_EGRESS -j ACCEPT"
    assert "-A SYSVM_INPUT -p icmp -j ACCEPT" in text


def test_interface_names_and_control_sources_are_parameters() -> None:
    cloudstack = RouterInterfaces(control="eth1", guest="eth0", public="eth2")
    bundle = bundle_with(
        [(1, "source-nat", {"public_ip": "203.0.113.5"})], control_sources=["169.254.0.1/32"]
    )
    text = render_iptables(bundle, cloudstack)
    assert chain_lines(text, "SYSVM_INPUT")[0] == (
        "-A SYSVM_INPUT -s 169.254.0.1/32 -i eth1 -p tcp -m tcp --dport 3922 -j ACCEPT"
    )
    assert "-A SYSVM_INPUT -i eth0 -p udp -m multiport --dports 67 -j ACCEPT" in text
    with pytest.raises(InvalidInput) as err:
        RouterInterfaces(control="eth0", guest="eth0")
    assert err.value.field == "interfaces.guest"
    with pytest.raises(InvalidInput):
        RouterInterfaces(public="eth2; reboot")


# ---------------------------------------------------------------- service configs


def test_dnsmasq_files() -> None:
    paths = RouterPaths("/etc/r1", "/var/lib/r1")
    files = render_router(make_bundle(), paths=paths).files
    conf = files["dnsmasq.conf"].splitlines()
    assert "interface=eth1" in conf
    assert "dhcp-range=set:guest,10.1.1.0,static,255.255.255.0,1h" in conf
    assert "dhcp-option=tag:guest,option:router,10.1.1.1" in conf
    assert "dhcp-hostsfile=/etc/r1/dnsmasq.dhcp-hosts" in conf
    assert "addn-hosts=/etc/r1/dnsmasq.hosts" in conf
    assert "dhcp-leasefile=/var/lib/r1/dnsmasq.leases" in conf
    assert "server=192.0.2.53" in conf and "domain=net-1.cloud.internal" in conf
    assert files["dnsmasq.dhcp-hosts"] == "02:00:0a:01:01:0a,10.1.1.10,web1\n"
    assert files["dnsmasq.hosts"] == "10.1.1.10 web1\n10.1.1.12 db.example.org\n"


def test_haproxy_config() -> None:
    cfg = render_router(make_bundle()).files["haproxy.cfg"]
    for line in (
        "frontend lb-web",
        "    bind 203.0.113.7:80",
        "    mode http",  # cookie stickiness needs HTTP mode
        "    default_backend lb-web",
        "backend lb-web",
        "    balance leastconn",
        "    cookie SERVERID insert indirect nocache",
        "    option httpchk GET /health",
        "    timeout check 2s",
        "    default-server inter 5s fall 3 rise 2",
        "    server 10.1.1.10:8000 10.1.1.10:8000 check cookie 10.1.1.10-8000",
        "    server 10.1.1.11:8001 10.1.1.11:8001 check cookie 10.1.1.11-8001",
    ):
        assert line in cfg.splitlines(), line
    source = render_router(
        bundle_with(
            [
                (
                    1,
                    "load-balancer",
                    {**VALID["load-balancer"], "stickiness": "source", "health_check": None},
                )
            ]
        )
    ).files["haproxy.cfg"]
    assert "    stick on src" in source and "    mode tcp" in source
    assert "check" not in source.split("backend lb-web")[1]


def test_vpn_files_use_l2tp_over_ipsec_with_the_psk_encoded() -> None:
    files = render_router(make_bundle()).files
    assert "    left=203.0.113.5" in files["ipsec.conf"]
    assert "    type=transport" in files["ipsec.conf"]
    psk = base64.b64encode(b"correct horse battery").decode()
    assert f"203.0.113.5 %any : PSK 0s{psk}" in files["ipsec.secrets"]
    assert "ip range = 10.1.2.2-10.1.2.8" in files["xl2tpd.conf"]
    assert "local ip = 10.1.2.1" in files["xl2tpd.conf"]
    assert files["xl2tpd.conf"].startswith(";")
    assert "ms-dns 10.1.1.1" in files["options.xl2tpd"]
    users = [line for line in files["chap-secrets"].splitlines() if not line.startswith("#")]
    assert users == ['"alice.b-c_1"\t*\t"s3cret pass!"\t*', '"bob"\t*\t"p@ss word\\"\\\\#"\t*']
    assert pppd_words(users[1]) == ["bob", "*", 'p@ss word"\\#', "*"]
    off = render_router(bundle_with([], vpn_users=[VALID_USER]))
    assert "alice" not in off.files["chap-secrets"]
    assert off.services == {"dnsmasq": True, "haproxy": False, "vpn": False}
    assert set(off.files) == {name for names in SERVICE_FILES.values() for name in names}


def _tmp_files(tmp_path: Path, bundle: RouterBundle) -> Path:
    rendered = render_router(bundle, paths=RouterPaths(str(tmp_path), str(tmp_path)))
    for name, text in rendered.files.items():
        (tmp_path / name).write_text(text)
    return tmp_path


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy not installed")
def test_haproxy_accepts_the_rendered_config(tmp_path: Path) -> None:
    d = _tmp_files(tmp_path, make_bundle())
    result = subprocess.run(
        ["haproxy", "-c", "-f", str(d / "haproxy.cfg")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(shutil.which("dnsmasq") is None, reason="dnsmasq not installed")
def test_dnsmasq_accepts_the_rendered_config(tmp_path: Path) -> None:
    d = _tmp_files(tmp_path, make_bundle())
    result = subprocess.run(
        ["dnsmasq", "--test", "-C", str(d / "dnsmasq.conf")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------- 10,000 rules, delta


def ten_thousand_rules() -> list[tuple[int, str, dict[str, Any]]]:
    """10,000 rules: ingress firewall, port forwarding, egress firewall and DHCP, 2,500 each."""
    out: list[tuple[int, str, dict[str, Any]]] = []
    n = 2_500
    for i in range(n):
        ip = f"10.1.{i // 250}.{2 + i % 250}"
        out += [
            (
                4 * i + 1,
                "firewall-ingress",
                {
                    "public_ip": "203.0.113.5",
                    "protocol": "tcp",
                    "start_port": 1 + i,
                    "source_cidrs": [f"198.51.100.{i % 256}/32"],
                },
            ),
            (
                4 * i + 2,
                "port-forward",
                {
                    "public_ip": "203.0.113.6",
                    "public_port": 10_000 + i,
                    "private_ip": ip,
                    "private_port": 80,
                    "protocol": "tcp",
                },
            ),
            (
                4 * i + 3,
                "firewall-egress",
                {"protocol": "udp", "start_port": 1 + i, "dest_cidrs": [f"192.0.2.{i % 256}/32"]},
            ),
            (
                4 * i + 4,
                "dhcp-entry",
                {"mac": f"02:00:00:00:{i >> 8:02x}:{i & 255:02x}", "ip": ip, "hostname": f"vm{i}"},
            ),
        ]
    return out


@functools.lru_cache(maxsize=1)
def big_bundle() -> RouterBundle:
    return RouterBundle.create(
        version=1,
        network=BundleNetwork("big", "10.1.0.0/16", "10.1.255.254"),
        addresses=RouterAddresses("169.254.9.9", "10.1.255.254", ("203.0.113.5", "203.0.113.6")),
        rules=ten_thousand_rules(),
    )


def one_rule_changed(bundle: RouterBundle, rule_id: int, **changes: Any) -> RouterBundle:
    data = bundle.to_dict()
    data["version"] += 1
    (entry,) = [r for r in data["rules"] if r["id"] == rule_id]
    entry["fields"].update(changes)
    return RouterBundle.from_dict(data)


def best_of(n: int, fn: Any) -> tuple[float, Any]:
    best, result = float("inf"), None
    for _ in range(n):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def test_ten_thousand_rule_bundle_validates_renders_and_round_trips() -> None:
    bundle = big_bundle()
    assert len(bundle.rules) == 10_000
    text = bundle.to_json()
    t_parse, again = best_of(3, lambda: RouterBundle.from_json(text))
    assert again.digest == bundle.digest
    changed = one_rule_changed(bundle, 4001, start_port=60_000, end_port=60_010).to_json()
    t_reparse, _ = best_of(3, lambda: RouterBundle.from_json(changed, previous=again))
    t_cold, rendered = best_of(1, lambda: render_router(bundle))
    t_render, rendered = best_of(3, lambda: render_router(bundle))
    t_digest, _ = best_of(3, lambda: live_digest(rendered.iptables, rendered.files))
    lines = rendered.iptables.count("\n-A ")
    print(
        f"\nTIMING 10k bundle: json {len(text)} bytes, from_json {t_parse:.3f}s, "
        f"from_json with previous (one rule changed) {t_reparse:.3f}s, render cold {t_cold:.3f}s "
        f"warm {t_render:.3f}s ({lines} iptables lines), live digest {t_digest:.3f}s"
    )
    assert lines > 10_000
    assert t_parse < 10 and t_render < 10


def test_changing_one_rule_of_ten_thousand_touches_one_chain() -> None:
    old = big_bundle()
    new = one_rule_changed(old, 4001, start_port=60_000, end_port=60_010)  # an ingress rule
    t_delta, delta = best_of(3, lambda: diff_rulesets(render_ruleset(old), render_ruleset(new)))
    assert delta.touched() == [("mangle", f"SYSVM_FWI_{4001 % 64:02d}")]
    text = delta.restore_text()
    assert text.startswith("*mangle\n:SYSVM_FWI_33 - [0:0]\n")
    assert [line for line in text.splitlines() if line.startswith(":")] == [":SYSVM_FWI_33 - [0:0]"]
    assert "COMMIT" in text
    assert "--dport 60000:60010" in text
    assert len(text.splitlines()) < 300
    print(f"\nTIMING one-rule delta of 10k: compute {t_delta:.3f}s, {len(text.splitlines())} lines")
    # A port-forward change touches its DNAT bucket and the bucket opening its port.
    pf = one_rule_changed(old, 4002, public_start_port=30_000, public_end_port=30_000)
    assert diff_rulesets(render_ruleset(old), render_ruleset(pf)).touched() == [
        ("mangle", "SYSVM_FWI_34"),
        ("nat", "SYSVM_DNAT_34"),
    ]


def test_delta_of_unchanged_or_version_only_bundles_is_empty() -> None:
    bundle = make_bundle(1)
    assert render_delta(bundle, bundle) == ""
    assert render_delta(bundle, make_bundle(2)) == ""


def test_delta_adds_and_removes_bucket_chains() -> None:
    old = bundle_with([(1, "source-nat", {"public_ip": "203.0.113.5"})])
    new = bundle_with(
        [
            (1, "source-nat", {"public_ip": "203.0.113.5"}),
            (70, "port-forward", VALID["port-forward"]),
        ]
    )
    added = diff_rulesets(render_ruleset(old), render_ruleset(new))
    assert [(c.table, c.name) for c in added.rewrite] == [
        ("mangle", "SYSVM_FWI_06"),
        ("mangle", "SYSVM_FW_INGRESS"),
        ("nat", "SYSVM_DNAT"),
        ("nat", "SYSVM_DNAT_06"),
    ]
    removed = diff_rulesets(render_ruleset(new), render_ruleset(old))
    text = removed.restore_text()
    assert "-X SYSVM_DNAT_06" in text and "-X SYSVM_FWI_06" in text
    assert text.index(":SYSVM_DNAT_06 - [0:0]") < text.index("-X SYSVM_DNAT_06")


# ---------------------------------------------------------------- real iptables in a namespace


NETNS_PROBLEM = netns_problem()
needs_netns = pytest.mark.skipif(NETNS_PROBLEM is not None, reason=str(NETNS_PROBLEM))
RESTORE_VARIANTS = [
    v for v in ("iptables-restore", "iptables-legacy-restore") if shutil.which(v) is not None
] or ["iptables-restore"]


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"sysvmtest-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def ns_run(ns: str, *cmd: str, stdin: str = "") -> tuple[float, subprocess.CompletedProcess[str]]:
    start = time.perf_counter()
    result = subprocess.run(
        ["ip", "netns", "exec", ns, *cmd], input=stdin, capture_output=True, text=True
    )
    return time.perf_counter() - start, result


def save_of(variant: str) -> str:
    return variant.replace("-restore", "-save")


@needs_netns
@pytest.mark.parametrize("variant", RESTORE_VARIANTS)
def test_iptables_restore_accepts_every_rule_type_and_saves_it_back_identically(
    netns: str, variant: str
) -> None:
    rendered = render_router(make_bundle())
    _, tested = ns_run(netns, variant, "--test", stdin=rendered.iptables)
    assert tested.returncode == 0, tested.stderr
    _, loaded = ns_run(netns, variant, stdin=rendered.iptables)
    assert loaded.returncode == 0, loaded.stderr
    _, saved = ns_run(netns, save_of(variant))
    assert saved.returncode == 0, saved.stderr
    assert canonical_netfilter(saved.stdout) == canonical_netfilter(rendered.iptables)
    assert live_digest(saved.stdout, rendered.files) == rendered.expected_live_digest
    # A foreign rule in one of our chains is drift.
    _, extra = ns_run(netns, variant.replace("-restore", ""), "-A", "SYSVM_INPUT", "-j", "ACCEPT")
    assert extra.returncode == 0, extra.stderr
    _, drifted = ns_run(netns, save_of(variant))
    assert live_digest(drifted.stdout, rendered.files) != rendered.expected_live_digest


@needs_netns
@pytest.mark.parametrize("variant", RESTORE_VARIANTS)
def test_ten_thousand_rules_restore_and_one_rule_delta_in_a_namespace(
    netns: str, variant: str
) -> None:
    old = big_bundle()
    new = one_rule_changed(old, 4001, start_port=60_000, end_port=60_010)
    full = render_router(old)
    t_test, tested = ns_run(netns, variant, "--test", stdin=full.iptables)
    assert tested.returncode == 0, tested.stderr
    t_full, loaded = ns_run(netns, variant, stdin=full.iptables)
    assert loaded.returncode == 0, loaded.stderr
    delta = render_delta(old, new)
    t_dtest, dtested = ns_run(netns, variant, "--test", "--noflush", stdin=delta)
    assert dtested.returncode == 0, dtested.stderr
    t_delta, applied = ns_run(netns, variant, "--noflush", stdin=delta)
    assert applied.returncode == 0, applied.stderr
    t_save, saved = ns_run(netns, save_of(variant))
    target = render_router(new)
    assert live_digest(saved.stdout, target.files) == target.expected_live_digest
    print(
        f"\nTIMING {variant} 10k rules in a netns: --test {t_test:.3f}s, restore {t_full:.3f}s, "
        f"one-rule delta --test {t_dtest:.3f}s, delta restore {t_delta:.3f}s, save {t_save:.3f}s"
    )


@needs_netns
def test_control_path_survives_a_ruleset_that_drops_everything_else(netns: str) -> None:
    """The control accept is the first rule of INPUT's chain, ahead of every rule and default."""
    bundle = bundle_with(
        [(1, "firewall-egress", {"protocol": "all"})],
        default_egress_policy="deny",
    )
    rendered = render_router(bundle)
    _, loaded = ns_run(netns, "iptables-restore", stdin=rendered.iptables)
    assert loaded.returncode == 0, loaded.stderr
    _, listed = ns_run(netns, "iptables", "-S", "SYSVM_INPUT")
    assert listed.stdout.splitlines()[1] == (
        "-A SYSVM_INPUT -s 169.254.0.0/16 -i eth0 -p tcp -m tcp --dport 3922 -j ACCEPT"
    )


def test_hostile_psk_and_password_stay_inside_their_lines() -> None:
    nasty = "x\"\\; $(reboot) `id` #' \\n"
    vpn = copy.deepcopy(VALID["remote-access-vpn"])
    vpn["psk"] = nasty
    user = {"username": "eve", "password": nasty}
    assert_free_text_is_contained("remote-access-vpn", "psk", vpn, vpn)
    assert_free_text_is_contained("vpn-user", "password", user, user)


# ---------------------------------------------------------------- delta semantics (model-based)

Model = dict[tuple[str, str], tuple[str, list[str]]]


def simulate_restore(model: Model, text: str, *, noflush: bool) -> Model:
    """What iptables-restore does to the tables we own, as a dict (table, chain) -> (policy, lines).

    Strict where the kernel is: appending to or jumping to a missing chain, and deleting a chain
    that is referenced or not empty, are errors."""
    state = {k: (p, list(lines)) for k, (p, lines) in model.items()}
    table = ""
    for line in text.splitlines():
        if line.startswith("*"):
            table = line[1:]
            if not noflush:
                for key in [k for k in state if k[0] == table]:
                    policy, _ = state[key]
                    if policy == "-":
                        del state[key]
                    else:
                        state[key] = (policy, [])
        elif line.startswith(":"):
            name, policy = line[1:].split()[:2]
            if policy != "-":
                state[(table, name)] = (policy, state.get((table, name), (policy, []))[1])
            else:
                state[(table, name)] = ("-", [])
        elif line.startswith("-F "):
            policy, _ = state[(table, line[3:])]
            state[(table, line[3:])] = (policy, [])
        elif line.startswith("-X "):
            key = (table, line[3:])
            assert not state[key][1], f"deleting non-empty {key}"
            assert not any(
                line.endswith(f"-j {key[1]}")
                for (t, _), (_, ls) in state.items()
                if t == table
                for line in ls
            ), f"deleting referenced {key}"
            del state[key]
        elif line.startswith("-A "):
            name = line.split()[1]
            assert (table, name) in state, f"append to missing {name}"
            target = line.rsplit("-j ", 1)[1].split()[0]
            if target.startswith("SYSVM_"):
                assert (table, target) in state, f"jump to missing {target}"
            state[(table, name)][1].append(line)
        else:
            assert line == "COMMIT", line
    return state


def model_of(bundle: RouterBundle) -> Model:
    return {k: (c.policy or "-", list(c.lines)) for k, c in render_ruleset(bundle).chains.items()}


def _pool() -> list[tuple[int, str, dict[str, Any]]]:
    """Rules that never conflict with each other, with ids sharing and splitting buckets."""
    pool: list[tuple[int, str, dict[str, Any]]] = []
    for n, rid in enumerate((1, 65, 129, 2, 66, 3)):
        pool.append(
            (
                rid,
                "firewall-ingress",
                {"public_ip": "203.0.113.6", "protocol": "tcp", "start_port": 100 + n},
            )
        )
    for n, rid in enumerate((4, 68, 5)):
        pool.append(
            (
                rid,
                "port-forward",
                {
                    "public_ip": "203.0.113.5",
                    "public_port": 8000 + n,
                    "private_ip": f"10.1.1.{10 + n}",
                    "private_port": 80,
                    "protocol": "tcp",
                    "open_firewall": n != 1,
                },
            )
        )
    pool += [
        (6, "static-nat", {"public_ip": "203.0.113.6", "private_ip": "10.1.1.20"}),
        (7, "source-nat", {"public_ip": "203.0.113.5"}),
        (8, "load-balancer", {**VALID["load-balancer"], "open_firewall": True}),
        (9, "remote-access-vpn", VALID["remote-access-vpn"]),
        (10, "firewall-egress", {"protocol": "udp", "start_port": 53}),
        (74, "firewall-egress", {"protocol": "icmp", "icmp_type": 8}),
        (11, "dhcp-entry", VALID["dhcp-entry"]),
        (12, "dns-entry", VALID["dns-entry"]),
    ]
    return pool


def test_delta_turns_any_old_ruleset_into_the_new_one() -> None:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    pool = _pool()
    subsets = st.lists(st.sampled_from(range(len(pool))), unique=True).map(sorted)

    @settings(max_examples=150, deadline=None)
    @given(
        subsets,
        subsets,
        st.sets(st.integers(0, len(pool) - 1)),
        st.sampled_from(["allow", "deny"]),
        st.sampled_from(["allow", "deny"]),
        st.sampled_from([["169.254.0.0/16"], ["169.254.0.1/32", "169.254.0.2/32"]]),
    )
    def check(
        old_ids: list[int],
        new_ids: list[int],
        moved: set[int],
        old_policy: str,
        new_policy: str,
        control: list[str],
    ) -> None:
        def rules(ids: list[int], bump: set[int]) -> list[tuple[int, str, dict[str, Any]]]:
            out = []
            for i in ids:
                rid, kind, f = pool[i]
                if i in bump and kind == "firewall-ingress":
                    f = {**f, "start_port": f["start_port"] + 1000}
                out.append((rid, kind, f))
            return out

        old = bundle_with(rules(old_ids, set()), default_egress_policy=old_policy)
        new = bundle_with(
            rules(new_ids, moved), default_egress_policy=new_policy, control_sources=control
        )
        live = simulate_restore({}, render_iptables(old), noflush=False)
        assert live == model_of(old)
        delta = diff_rulesets(render_ruleset(old), render_ruleset(new))
        after = simulate_restore(live, delta.restore_text(), noflush=True)
        assert after == model_of(new)
        for key in delta.touched():
            assert model_of(old).get(key) != model_of(new).get(key)

    check()


def test_live_digest_ignores_counters_comments_order_and_foreign_chains() -> None:
    rendered = render_router(make_bundle())
    text = rendered.iptables
    noisy = "# Generated by iptables-save\n" + text.replace("[0:0]", "[12:3456]")
    tables = noisy.split("COMMIT\n")
    reordered = "COMMIT\n".join([tables[2], tables[0], tables[1], ""])
    foreign = (
        reordered.replace("*filter\n", "*filter\n:DOCKER - [0:0]\n-A DOCKER -j RETURN\n", 1)
        + "*raw\n:PREROUTING ACCEPT [0:0]\n-A PREROUTING -j CT --notrack\nCOMMIT\n"
    )
    assert live_digest(foreign, rendered.files) == rendered.expected_live_digest
    changed_file = {**rendered.files, "haproxy.cfg": rendered.files["haproxy.cfg"] + "# x\n"}
    assert live_digest(foreign, changed_file) != rendered.expected_live_digest
    policy = text.replace(":FORWARD DROP [0:0]", ":FORWARD ACCEPT [0:0]")
    assert live_digest(policy, rendered.files) != rendered.expected_live_digest


@needs_netns
@pytest.mark.parametrize("variant", RESTORE_VARIANTS)
def test_deltas_that_add_and_delete_chains_apply_for_real(netns: str, variant: str) -> None:
    pool = _pool()
    small = bundle_with([r for r in pool if r[0] in (1, 7)], default_egress_policy="allow")
    large = bundle_with(pool, default_egress_policy="deny", control_sources=["169.254.0.1/32"])
    _, loaded = ns_run(netns, variant, stdin=render_iptables(small))
    assert loaded.returncode == 0, loaded.stderr
    for old, new in ((small, large), (large, small)):
        delta = render_delta(old, new)
        _, applied = ns_run(netns, variant, "--noflush", stdin=delta)
        assert applied.returncode == 0, applied.stderr + delta
        _, saved = ns_run(netns, save_of(variant))
        assert canonical_netfilter(saved.stdout) == canonical_netfilter(render_iptables(new))
