"""Exports to other trainers' cache layouts."""
