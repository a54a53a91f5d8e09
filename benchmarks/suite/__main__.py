"""`python -m benchmarks.suite`: see benchmarks/README.md."""

from .cli import main

raise SystemExit(main())
