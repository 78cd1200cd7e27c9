"""meshproxy: a service-mesh data-plane sidecar on trio."""

__version__ = "0.1.0"
