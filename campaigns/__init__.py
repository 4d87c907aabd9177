"""Campaigns: segments, timezone staggering and the throttled producer (issue 4, not built yet)."""
