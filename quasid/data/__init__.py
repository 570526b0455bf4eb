"""Data: contracts-conforming datasets, the synthetic world, the Amazon import, splits."""
