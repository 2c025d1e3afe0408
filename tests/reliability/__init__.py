"""The reliability and security suite (`make test-reliability`, in CI): faults, load, hostile input, secrets, and
the known defects each with the test that failed before its fix. docs/reliability.md lists every scenario."""
