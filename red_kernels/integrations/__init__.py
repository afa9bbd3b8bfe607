"""Adapters for training engines: one leaf module per engine, imported only by name, never by the core."""
