"""Concurrency slots in Redis: the fast path, reconciled against PostgreSQL (the truth).

``keys``/``scripts`` talk to Redis, ``backend`` fills the slots seam, ``relay``
applies the slot-release outbox and keeps live slots from expiring,
``reconciler`` repairs drift, ``metrics`` exposes the figures.
"""
