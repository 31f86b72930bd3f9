"""Metrics (defined only in ``metrics``), Triton-style statistics and collectors."""
