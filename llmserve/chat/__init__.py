"""Chat prompt rendering and output post-processing."""
