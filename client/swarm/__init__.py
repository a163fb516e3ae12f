"""Swarm client: local embeddings and LM head, remote blocks along a planned route."""
