"""Storage: URIs, corpus listing, shard plans, run store (manifest, markers, lock), Parquet."""
