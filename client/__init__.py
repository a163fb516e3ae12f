"""Processes that use the servers: the training node, the swarm client, edge export."""
