"""API keys, hashed at rest.

A key is ``nk_`` + 43 URL-safe characters (256 random bits), shown once at creation. Only its
SHA-256 is stored (a fast hash is enough for a high-entropy secret: there is nothing to guess),
plus a short prefix so an operator can tell keys apart in ``notifyctl apikeys list``.
"""

from __future__ import annotations

from datetime import datetime

from sqlmodel import Field, SQLModel

from notifyctl.models import utcnow


class ApiKey(SQLModel, table=True):
    __tablename__ = "api_keys"
    id: str = Field(primary_key=True, max_length=32)
    name: str = Field(max_length=128)
    key_hash: str = Field(unique=True, index=True, max_length=64)  # hex sha256
    prefix: str = Field(max_length=16)  # first characters of the key, for display only
    created_at: datetime = Field(default_factory=utcnow)
    revoked_at: datetime | None = None
    # Added with scopes: nullable so ``db.add_missing_columns`` adds it; a key made before (NULL) is admin.
    scope: str | None = Field(default=None, max_length=16)
