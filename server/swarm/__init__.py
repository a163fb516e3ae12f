"""Swarm serving: the registry of block servers, and block servers holding spans of a model."""
