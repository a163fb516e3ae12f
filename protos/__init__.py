"""Wire formats of fedswarm: ``swarm.proto``, its generated stubs, and the codecs around them."""
