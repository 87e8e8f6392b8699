"""sysvm engine: services, drivers and the API the console talks to."""

__version__ = "0.1.0"
