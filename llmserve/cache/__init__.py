"""Persistent prefix cache: KV state in token blocks chained by hash, RAM and disk tiers."""
