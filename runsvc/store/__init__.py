"""The store: SQLAlchemy schema and guarded statements. SQL stops here."""
