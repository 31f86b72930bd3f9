"""Models on disk, their versions and states (SQLite), load/unload/reload."""
