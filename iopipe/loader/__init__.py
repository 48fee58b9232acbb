"""DataLoader: torch's DataLoader signature and semantics on the engine."""
