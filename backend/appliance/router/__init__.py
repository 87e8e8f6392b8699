"""The router appliance's renderers: a router bundle in, iptables-restore input and service configs out.

Pure functions, no I/O: the applier (which runs inside the router) writes what they return.
"""
