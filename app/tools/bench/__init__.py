"""`molink bench` modes, one module each."""
