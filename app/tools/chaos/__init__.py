"""`molink chaos`: a local group under worker kills, freezes and link cuts, scored against a
fault-free run.  ``options`` (light: the parser's defaults), ``group`` (the processes and the
faults), ``score`` (what was observed, pure), ``run`` (the workload and the report)."""
