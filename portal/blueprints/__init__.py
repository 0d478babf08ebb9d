"""One blueprint per area, each named ``bp``."""
