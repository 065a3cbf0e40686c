"""`nabla-wan generate`: the parser, the plan (every check), the session (load, levers, warm-up), a timed run and
what it reports."""
