"""Vector index and SQL metadata for retrieval (issue 3). Takes vectors; knows nothing of torch."""
