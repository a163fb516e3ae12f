"""Local federations on Ray (Flower Simulation Engine) and data partitioning."""
