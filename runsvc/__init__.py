"""runsvc: the source of truth for whether a tenant's run is really still running."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("runsvc")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"
