"""Routing between engines: the fallback (itself an engine) and its circuit breaker."""
