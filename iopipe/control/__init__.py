"""Controllers: pure decision rules (concurrency hill-climbing, read governors)."""
