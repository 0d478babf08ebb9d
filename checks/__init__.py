"""Nagios checks bundled with Corral (nagiosplugin), installed as console scripts."""

from __future__ import annotations

import argparse
import sys


class PluginArgumentParser(argparse.ArgumentParser):
    """Bad arguments are UNKNOWN (exit 3) with a status line, not argparse's exit 2 (CRITICAL)."""

    def __init__(self, *args, status_name: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.status_name = status_name

    def error(self, message):
        self.print_usage(sys.stderr)
        print(f"{self.status_name} UNKNOWN: {message}")
        sys.exit(3)
