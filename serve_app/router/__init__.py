"""The HTTP ingress: OpenAI and TGI routes, dispatched to tiers."""
