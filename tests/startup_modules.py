"""What a program run as a file (`python -S FILE`) imports at start, for the tests of programs
whose start every SSH command or every apply pays."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def modules_added_by(path: Path | str) -> set[str]:
    """Modules loaded by executing `path`'s top level as a file (not as `__main__`), beyond
    those of a bare `python -S`."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    listing = "print(' '.join(sorted(sys.modules)))"
    as_file = (
        f"import sys; f = {str(path)!r}; sys.argv = [f]; "
        "exec(compile(open(f).read(), f, 'exec'), {'__name__': 'probe', '__file__': f}); "
    )

    def modules(code: str) -> set[str]:
        argv = [sys.executable, "-S", "-c", code]
        done = subprocess.run(argv, capture_output=True, text=True, env=env, check=True)
        return set(done.stdout.split())

    return modules(as_file + listing) - modules("import sys; " + listing)
