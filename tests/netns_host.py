"""Can this machine run tests in network namespaces? (root, iproute2, iptables, a probe namespace)"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid


def netns_problem() -> str | None:
    """Why network namespace tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root to create a network namespace"
    if shutil.which("ip") is None:
        return "iproute2 (ip) not installed"
    if shutil.which("iptables-restore") is None:
        return "iptables not installed (apt-get install iptables)"
    name = f"sysvmprobe-{uuid.uuid4().hex[:8]}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None
