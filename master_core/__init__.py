"""MoLink master core: group membership, placement, scheduler, relay and the HTTP API."""
