"""Trio drivers: the only code that awaits sockets."""
