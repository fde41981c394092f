"""The data layer: dataset configs, readers, the data directory, splitting and the frozen split store."""
