"""Delivery analytics: an hourly rollup kept up as statuses change, coarse tiers folded from it, and
the funnel read over them. One module a job, in the order a count travels:

- ``rollup``: what the rollup and its coarse tiers are keyed by (the key's SQL per dialect, the
  tiers' columns and dimensions, ISO weeks), and the rollup as a full count over ``deliveries``;
- ``triggers``: the triggers that keep the rollup up, and ``install`` (create them, backfill, upgrade
  an older definition);
- ``install``: what installing a set of triggers takes (the rollup's and the waves' alike): writers
  held off, the older definition dropped, the new one created and its counts filled, in one
  transaction;
- ``fold``: ``compact``, the coarse tiers' upkeep off the status changes' path;
- ``plan``: which tiers a funnel read takes its rows from (``--since``, filters, grouping);
- ``read``: ``funnel()``, the read itself, and ``parse_since``;
- ``export``: the report as CSV rows (the CLI's ``--csv`` and the console's export);
- ``checks``: the tiers counted from scratch and compared (tests, benchmarks);
- ``waves``: beside the rollup, a campaign's counts per time-zone wave (``wave_counts``: new
  deliveries counted by the rollup's insert trigger, status changes by an update trigger of its
  own; folded by ``compact`` on PostgreSQL), what the console's Campaigns page and ``campaign
  status`` show.

``analytics_hourly`` counts deliveries by the hour they were queued (UTC) × template × channel ×
campaign × status (× the kind of reason, for ``failed`` and ``suppressed``). Triggers on
``deliveries`` keep it up in the same transaction as every write, whoever writes — the worker's
batch, a webhook, a DLQ replay, the reconciler: a committed status change moves one count from
the old row to the new one, a rolled-back one (a worker killed mid-batch) moves nothing.

- SQLite (one writer at a time): row triggers upsert the rollup directly; the worker's batch
  insert skips them, and its rows are counted from the rows themselves instead, one upsert per
  group (``triggers.counted_insert``).
- PostgreSQL: statement triggers append what each statement changed, aggregated, to
  ``analytics_delta`` (appends: concurrent workers never wait on each other's rollup row);
  ``compact`` folds it into the rollup (the worker pool does so every few seconds). The worker's
  batch insert tells the insert trigger to skip it (a transaction-local setting), and appends its
  rows' counts itself, grouped from the rows (``triggers.counted_insert``).

The coarse tiers, for reads that stay instant at 10,000,000 deliveries (the hourly rollup then
holds millions of rows): ``analytics_total`` (the rollup without time), ``analytics_daily``
(per day, for one dimension at a time: template, channel, campaign, or all) and
``analytics_weekly`` (per ISO week, for template, channel or campaign: a ``--since 30d`` read by
template takes its whole weeks from here and at most six edge days from the daily tier: measured
at 1,000,000 deliveries, load average ~3 on 2 cores, SQLite 73 → 21 ms, PostgreSQL execution
30 → 12 ms). ``compact`` folds into them what changed in the rollup since the last fold, off the
status changes' path: on SQLite the hourly rows whose ``n`` moved past ``folded`` (a partial
index holds them), on PostgreSQL the deltas as it moves them. A late change (an open days after
the send) moves a count in an hour long folded: it is read from the hourly row until the next
fold, then from its day. The funnel reads a tier and what is not folded into it yet, in one
statement, so it is exact whenever it runs (``plan``).

The rollup is the analytics store: ``notifyctl purge`` (retention) deletes deliveries but not
what they counted, so reports cover more than the raw rows kept.

The funnel: ``sent`` counts what reached the provider (now sent, delivered or opened),
``delivered`` what was delivered (delivered or opened), ``opened`` what was opened.
"""
