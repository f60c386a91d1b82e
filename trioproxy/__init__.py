"""trioproxy: start web services on demand and relay HTTP and WebSocket traffic to them."""

__version__ = "0.1.0"
