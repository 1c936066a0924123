"""Data: sources (local folder, WebDataset shards), Stage C aspect buckets, the loader, and caches."""
