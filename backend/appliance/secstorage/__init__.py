"""The secondary storage VM's agent: downloads and uploads templates into the image store over fixed SSH commands."""

from __future__ import annotations

from backend.appliance.secstorage.agent import register_secstorage

__all__ = ["register_secstorage"]
