"""The development stack: serve-app on this machine (`python -m devstack.localstack up|down`),
and the host helpers that the tests and the benchmarks share. Not part of what is deployed."""
