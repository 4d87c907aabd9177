"""The HTTP side of notifyctl: the ``/v1`` API (API keys), provider webhooks, unsubscribe and open tracking.

``create_app(ctx)`` builds the FastAPI application; ``notifyctl serve`` runs it under uvicorn.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastapi import FastAPI


def create_app(ctx: Any, **kwargs: Any) -> FastAPI:
    from notifyctl.api.app import create_app as _create

    return _create(ctx, **kwargs)


__all__ = ["create_app"]
