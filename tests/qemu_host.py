"""A real libvirtd + QEMU/KVM (`qemu:///system`) for the tests that need one.

`scripts/libvirtd-up` (run by `make test`) installs and starts it where it can; here we only
check that it is there, and skip with the precise reason where it is not:

    from tests.qemu_host import destroy_domains, virsh

    def test_something(qemu_uri: str, qemu_prefix: str) -> None:
        name = qemu_prefix + "ssvm"       # every domain a test makes starts with its prefix
        ...
        virsh("destroy", name)            # an outside actor, as an operator would

- `qemu_uri` (session): "qemu:///system" once the libvirt binding can open it, /dev/kvm is
  usable and qemu-system-x86_64 and virsh exist; otherwise the test is skipped, saying which.
- `qemu_prefix` (per test): a unique domain-name prefix; its domains are destroyed and
  undefined when the test ends, whatever happened.
- `virsh(*args)`: `virsh -c qemu:///system ARGS` in a separate process (never raises on a
  non-zero exit: look at `.returncode`, `.stdout`, `.stderr`).
- `destroy_domains(prefix)`: destroy + undefine every domain whose name starts with prefix.

Domain names are global on the host: always use a prefix, never a fixed name.
"""

from __future__ import annotations

import fcntl
import functools
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator

import pytest

QEMU_URI = "qemu:///system"
QEMU_BINARY = "qemu-system-x86_64"
KVM_DEVICE = "/dev/kvm"
_KVM_GET_API_VERSION = 0xAE00  # _IO(KVMIO=0xAE, 0x00); the stable KVM API answers 12
_SET_UP = "run `sh scripts/libvirtd-up` as root"


def _kvm_problem() -> str | None:
    if not os.path.exists(KVM_DEVICE):
        return f"{KVM_DEVICE} does not exist (no KVM on this machine)"
    try:
        fd = os.open(KVM_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return f"{KVM_DEVICE} cannot be opened read-write: {exc.strerror}"
    try:
        version = fcntl.ioctl(fd, _KVM_GET_API_VERSION)
    except OSError as exc:
        return f"{KVM_DEVICE} does not answer KVM_GET_API_VERSION: {exc.strerror}"
    finally:
        os.close(fd)
    if version != 12:
        return f"{KVM_DEVICE} speaks KVM API {version}, not 12"
    return None


def _libvirt_problem() -> str | None:
    try:
        import libvirt
    except ImportError as exc:
        return f"the libvirt python binding is not importable: {exc}"
    try:
        conn = libvirt.open(QEMU_URI)
    except libvirt.libvirtError as exc:
        return f"libvirt cannot open {QEMU_URI}: {exc.get_error_message()} ({_SET_UP})"
    try:
        # Raises unless this libvirtd's QEMU can run KVM domains on x86_64.
        conn.getDomainCapabilities(None, "x86_64", None, "kvm")
    except libvirt.libvirtError as exc:
        return f"{QEMU_URI} cannot run KVM domains: {exc.get_error_message()}"
    finally:
        conn.close()
    return None


@functools.cache
def qemu_host_problem() -> str | None:
    """Why this machine cannot run real QEMU/KVM domains for the tests, or None if it can.

    Checked once per process (cheap things first), so a `skipif` may call it too."""
    problem = _kvm_problem()
    if problem is None and shutil.which(QEMU_BINARY) is None:
        problem = f"{QEMU_BINARY} is not installed ({_SET_UP})"
    if problem is None and shutil.which("virsh") is None:
        problem = f"virsh (libvirt-clients) is not installed ({_SET_UP})"
    if problem is None:
        problem = _libvirt_problem()
    return problem


@pytest.fixture(scope="session")
def qemu_uri() -> str:
    """`qemu:///system`, or skip the test with the reason this machine has none usable."""
    problem = qemu_host_problem()
    if problem is not None:
        pytest.skip(f"real QEMU/KVM unavailable: {problem}")
    return QEMU_URI


@pytest.fixture
def qemu_prefix(qemu_uri: str) -> Iterator[str]:
    """A domain-name prefix unique to this test; its domains are removed when it ends."""
    prefix = f"sysvmtest-{uuid.uuid4().hex[:8]}-"
    destroy_domains(prefix)
    try:
        yield prefix
    finally:
        destroy_domains(prefix)


def virsh(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run `virsh -c qemu:///system ARGS` as an outside actor (another process, its own
    connection), e.g. `virsh("destroy", name)` to kill a domain behind the engine's back."""
    return subprocess.run(
        ["virsh", "-c", QEMU_URI, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def destroy_domains(prefix: str) -> list[str]:
    """Destroy (if running) and undefine (if persistent) every domain on qemu:///system whose
    name starts with prefix; return their names. A domain that vanishes meanwhile is fine."""
    if not prefix:
        raise ValueError("destroy_domains needs a non-empty prefix: it would remove every domain")
    import libvirt

    undefine_flags = (
        libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
        | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
        | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
        | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
    )
    gone = (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_OPERATION_INVALID)
    removed: list[str] = []
    conn = libvirt.open(QEMU_URI)
    try:
        for dom in conn.listAllDomains():
            name = dom.name()
            if not name.startswith(prefix):
                continue
            try:
                if dom.isActive():
                    dom.destroy()
                if dom.isPersistent():
                    dom.undefineFlags(undefine_flags)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() not in gone:  # already destroyed / undefined
                    raise
            removed.append(name)
    finally:
        conn.close()
    return removed
