"""The run config: its typed schema (``schema``), YAML and ``key=value`` overrides (``loading``), one-line errors
(``messages``)."""
