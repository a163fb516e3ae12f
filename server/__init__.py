"""Processes that serve: the federated coordinator, swarm block servers, the registry."""
