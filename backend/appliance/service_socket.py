"""Where a netns router's appliance service listens (shared by the service and its relay)."""


def socket_name(vm: str) -> str:
    """The abstract Unix socket of router `vm`'s service: it exists only in the router's network
    namespace and leaves no file behind."""
    return f"\0sysvm-appliance-{vm}"
