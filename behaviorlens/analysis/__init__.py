"""Metrics, plots and the HTML report."""
