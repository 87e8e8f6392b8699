# sysvm: `make run` opens the console on the embedded lab; `make test` runs the whole suite.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Debian packages: the libvirt client library and headers to build libvirt-python, a compiler,
# venv support, tmux (the console is meant to live in it); iproute2, iptables, haproxy and dnsmasq for
# the router appliance; qemu-utils (qemu-img) and curl for the template tests and benchmark;
# openssh-server (each router's sshd in the netns lab) and busybox (udhcpc, its DHCP test).
SYSTEM_PACKAGES := libvirt-dev libvirt0 pkg-config gcc python3-dev python3-venv tmux \
	iproute2 iptables haproxy dnsmasq-base qemu-utils curl openssh-server busybox

.PHONY: run test bench screenshots lint system-packages venv libvirtd clean

system-packages:
	@sh scripts/system-packages $(SYSTEM_PACKAGES)

$(BIN)/.installed: pyproject.toml | system-packages
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

venv: system-packages $(BIN)/.installed

run: venv
	$(BIN)/sysvm lab up
	$(BIN)/sysvm tui

# A real libvirtd + QEMU/KVM (qemu:///system) for the tests that need one. Where the machine
# cannot have one (not root, no usable /dev/kvm, no apt) it says why and those tests skip.
libvirtd: system-packages
	@sh scripts/libvirtd-up

lint: venv
	$(BIN)/ruff check backend tui_app tests bench
	$(BIN)/ruff format --check backend tui_app tests bench
	$(BIN)/mypy backend

test: venv lint libvirtd
	$(BIN)/python -m pytest -rs -q

bench: venv
	@for b in bench/bench_*.py; do $(BIN)/python $$b || exit 1; done

screenshots: venv
	$(BIN)/python -m tui_app.screenshots screenshots

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
