"""The protobuf edge: the servicer, serde, status mapping, callers, rate limits and TLS."""
