"""Converters from other trainers' configurations to cascade-runner recipes (`runner import TOOL ...`)."""
