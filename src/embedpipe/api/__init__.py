"""The HTTP layer: ``app.create_app(settings)``, one router per API surface, middleware.

Nothing outside this package imports it except the CLI (the composition root); routes are thin
adapters over the core (``operations/``, ``service.py``, ``batches/``).
"""
