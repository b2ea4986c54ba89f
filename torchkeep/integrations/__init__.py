"""Integrations with the frameworks people train with; each module imports its framework only when imported."""
