"""The fault suite (``make chaos``): ``python -m chaos.run`` (one host, the six faults of issue 8),
``chaos.multihost`` (several hosts, partitions, shards) and ``chaos.sentinel`` (a Sentinel
failover); figures go to chaos/RESULTS.md. A package of the checkout, not of the wheel."""
