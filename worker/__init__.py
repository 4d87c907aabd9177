"""The RQ side of notifyctl: jobs, pipeline stages, the pool, and providers."""
