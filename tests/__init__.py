"""The test suite: one folder per package (core, methods, evaluations, harness, benchmarks), shared helpers in helpers/."""
