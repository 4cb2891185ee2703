"""The HTTP API (FastAPI, versioned under /v1); the app is built by ``xdlabel.api.app.create_app``.

Nothing is imported here: commands that only need ``xdlabel.api.auth`` (API keys) must not pay for
the model, Label Studio's converter and FastAPI on every run."""
