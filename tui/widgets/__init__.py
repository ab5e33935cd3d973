"""Widgets of the prune workbench: charts, tables, findings, form fields, stage list."""
