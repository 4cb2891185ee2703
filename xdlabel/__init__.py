"""xdlabel: the application around X-Decoder (CLI, demo; later the HTTP API and ingestion jobs)."""
