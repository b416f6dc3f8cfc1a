"""The network lab: homes, routers, NATs and shaped links in network namespaces (Linux, root)."""
