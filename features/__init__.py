"""Model-agnostic feature definitions shared by the trainer and the server (no torch)."""
