"""Network and process faults for the tools: ``tcp_proxy`` (a TCP proxy that can cut its
connections) and ``procctl`` (freeze, thaw and kill a process on every OS).  Imports nothing
else of ``app``."""
