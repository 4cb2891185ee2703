"""Vector index and SQL metadata for retrieval. Takes vectors; knows nothing of torch."""
