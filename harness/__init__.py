"""What the tests and the benchmarks share: the app started as a user starts it
(`harness.app_process`), the tiny and two-style models they train (`harness.tiny_model`) and the
browser the page tests drive (`harness.browser`). Importable without pytest, so `make demo` and
every benchmark run where tests/ is not shipped (the Docker image)."""
