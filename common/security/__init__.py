"""Security of every role, in one place: the federation's CA and the certificates it issues
(``certificates.py``), TLS connections of the swarm with the optional token (``transport.py``), who a
swarm peer is by its certificate (``identity.py``) and a node's authentication key pair for Flower's
SuperNode authentication (``node_key.py``). The registry's deny list and announce limits use
these (``server/swarm/registry.py``)."""
