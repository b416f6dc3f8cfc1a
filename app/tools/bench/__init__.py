"""`molink bench`: ``options`` (light: the parser's defaults, link profiles), ``common`` (the shaped
local group every real bench runs on), ``run`` (policies side by side, real or simulated, and the
dispatch to the others), ``burst``, ``hops``, ``local`` (MoLink against one transformers process)
and ``chain`` (the stages as bare processes in a pipe chain)."""
