"""FaceGate's benchmark suite: Identify latency against the budget, scale, throughput, cost.

    uv run python -m benchmarks.suite --quick     # under 2 minutes; what CI runs
    uv run python -m benchmarks.suite             # the full mode (about 18 minutes)

Each scenario starts a real `facegate serve` process (default worker settings, its own
temporary data directory, configured by FACEGATE_* variables), enrols the real people of
../shared/faces through the API over synthetic members written straight into its store,
and has 1 to 8 turnstile threads call Identify over real gRPC. Cloud scenarios point the
server at a `facegate azure-emulator` process driven through its fault modes; the
worker-scaling scenario runs a 1-worker and a 2-worker server side by side. See
benchmarks/README.md for what is measured and the recorded figures.

The modules: plan (scenarios, modes), frames (faces and probe frames), gallery (synthetic
members), processes (server, emulator, memory), load (turnstiles), stages (the local
pipeline in-process), stats (percentiles, verdicts, cost, aims), report (JSON, Markdown,
terminal), plots, runner (the whole run), cli, check (the JSON schema, for CI).
"""
