"""Server-Sent Events from the cache's change feed (see app.py)."""
