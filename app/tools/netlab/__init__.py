"""Networks for the tools and tests: ``tcp_proxy`` (a TCP proxy that can cut its connections),
``procctl`` (freeze, thaw and kill a process on every OS) and the network lab (``lab``,
``topology``, ``delay``, ``command``: homes, routers, NATs and shaped links in network
namespaces; Linux, root).  Imports nothing else of ``app`` outside this package."""
