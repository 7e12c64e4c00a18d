"""Prometheus metrics: counters fed by the service, gauges read from the store, gRPC metrics.

Every metric lives in a registry of its own per server (never the global
one), so that several servers in one process, as in tests, do not collide.
No label carries a run id, a worker id or a free text: docs/operations.md lists
the label sets and their cardinality.
"""
