"""Command groups of the ``devmeter`` CLI that live apart from devmeter/cli.py, registered on
its ``main`` group when it is imported (STYLE: one module per command group as the CLI grows)."""
