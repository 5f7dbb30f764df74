"""Publishing commands: the publisher library and the load generator."""
