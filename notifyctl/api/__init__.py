"""The HTTP side of notifyctl: the ``/v1`` API (API keys), provider webhooks, unsubscribe and open tracking.

``notifyctl.api.app.create_app(ctx)`` builds the FastAPI application; ``notifyctl serve`` runs it under
uvicorn. This package's ``__init__`` stays empty so that the CLI's API-key commands (``notifyctl.api.auth``)
do not load FastAPI.
"""
