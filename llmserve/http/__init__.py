"""The HTTP layer: app factory, error handlers and thin routes."""
