"""MoLink worker core: serve a range of decoder layers over a tunnel to the master."""
