"""The campaign table. Recipients are ``Notification`` rows with ``campaign_id`` set (one per
recipient, by the unique index on (campaign_id, recipient_id)); this row holds what is needed to
display, control and relaunch the campaign."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, Column
from sqlmodel import Field, SQLModel

from notifyctl.models import utcnow


class CampaignStatus(StrEnum):
    active = "active"  # producing (launched_at unset) or sending on schedule
    paused = "paused"
    canceled = "canceled"


class Campaign(SQLModel, table=True):
    __tablename__ = "campaigns"
    id: str = Field(primary_key=True, max_length=32)
    name: str = Field(index=True, max_length=255)
    template_id: str = Field(max_length=128)
    category: str = Field(max_length=32)
    priority: str = Field(max_length=8)
    channels: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    status: str = Field(default=CampaignStatus.active, max_length=16)
    # Everything a relaunch needs: segment source, schedule flags, template data, rate.
    spec: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    # The waves: [{"instant", "start", "end", "recipients", "timezones"}], computed once at launch.
    plan: list[dict[str, Any]] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    # The last launch run's counts (rows read, written, skipped, bad rows with line numbers).
    summary: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    reference_at: datetime = Field(default_factory=utcnow)  # the "now" the schedule was computed from
    launched_at: datetime | None = None  # every recipient written
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)
