"""Model tiers: the deployment that owns an engine, and how a request picks a tier."""
