"""Where a netns router's appliance service listens (shared by the service and its relay)."""


def socket_name(vm: str) -> str:
    """The abstract Unix socket of router `vm`'s service: it exists only in the router's network
    namespace and leaves no file behind."""
    return f"\0sysvm-appliance-{vm}"


# The first word of a framed answer (asked for with `"answer": "frame"` in the request):
# `SYSVM-ANSWER STATUS STDOUT_BYTES STDERR_BYTES\n`, then stdout's bytes, then stderr's.
ANSWER_FRAME = b"SYSVM-ANSWER"


def framed_answer(status: int, stdout: str, stderr: str) -> bytes:
    # backslashreplace: a lone surrogate (from an undecodable byte) must not cost the answer.
    out, err = (
        stdout.encode("utf-8", "backslashreplace"),
        stderr.encode("utf-8", "backslashreplace"),
    )
    return b"%s %d %d %d\n" % (ANSWER_FRAME, status, len(out), len(err)) + out + err
