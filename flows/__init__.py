"""Prefect flows: orchestration only (plan shards, map tasks, aggregate, log)."""
