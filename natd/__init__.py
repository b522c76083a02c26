"""natd: a user-space NAT daemon for VM and container networks."""

__version__ = "0.1.0"
