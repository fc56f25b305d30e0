"""Event kinds, the Arrow schema of event batches, the msgpack/JSON codec and validation."""
