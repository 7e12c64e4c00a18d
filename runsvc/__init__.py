"""runsvc: the source of truth for whether a tenant's run is really still running."""

__version__ = "0.1.0"
