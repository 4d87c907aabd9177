"""Campaigns: one template to a whole segment, on a schedule, at a pace.

- ``segments``: who it goes to (a CSV file, a SQL query), streamed row by row;
- ``schedule``: when each recipient's notification goes out (``--send-at``, ``--stagger-tz``, waves);
- ``launcher``: ``notifyctl campaign launch`` — ``resolve`` (the flags, or a relaunch's), ``plan``
  (the plan pass), ``produce`` (the write pass: one notification per recipient, those due now
  ``queued`` and enqueued per shard after the commit, the rest ``scheduled`` for the reconciler at
  the campaign's ``--rate``), ``dryrun`` (what a launch would do, sending nothing);
- ``state``: pause, resume, cancel; ``report``: status and listing; ``names``: names and references;
- ``config``: ``NOTIFY_CAMPAIGN_*`` settings. The ``campaigns`` table itself is
  ``notifyctl.models.Campaign``.
"""
