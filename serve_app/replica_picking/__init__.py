"""Which router replica serves a request: prefix affinity with a load bound (docs/routing.md)."""
