"""Stream memory: what a stream keeps (sinks, short-term, long-term pages) and how it is compressed."""
