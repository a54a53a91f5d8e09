"""Recognition engines: the interface, the local engine and its worker processes."""
