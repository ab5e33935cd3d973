"""Screens of the prune workbench: set-up steps, run, results, and the modal dialogs."""
