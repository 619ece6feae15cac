"""Reports: the tour (``fewer tour``) and the helpers that write Markdown tables and PNG plots."""
