"""The score phase: read per-token caches, sweep kNN-LM settings, emit JSON lines."""
