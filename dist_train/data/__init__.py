"""Data: sample schema, shard sets, synthetic data, packing, streaming, inspection, extraction."""
