"""Stages: one operator per module (source, reader, prefetch, decode, batch, cache, device)."""
