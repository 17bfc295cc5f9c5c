"""Diagnostics built on the estimators: where the bound goes, and why likelihood and
generation quality disagree."""
