"""Request scheduling: queue, dynamic batching, deadlines, instance slots."""
