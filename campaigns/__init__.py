"""Campaigns: one template to a whole segment, on a schedule, at a pace.

- ``segments``: who it goes to (a CSV file, a SQL query), streamed row by row;
- ``schedule``: when each recipient's notification goes out (``--send-at``, ``--stagger-tz``, waves);
- ``launcher``: ``notifyctl campaign launch`` — plan, then write one ``scheduled`` notification per
  recipient; the worker pool's reconciler queues them as they come due, at the campaign's ``--rate``;
- ``state``: pause, resume, cancel; ``report``: status and listing; ``names``: names and references;
- ``config``: ``NOTIFY_CAMPAIGN_*`` settings. The ``campaigns`` table itself is
  ``notifyctl.models.Campaign``.
"""
