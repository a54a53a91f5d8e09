"""The Azure Face engine, its read model, and the outbox replayer that keeps the cloud in step."""
