"""Nagios checks bundled with Corral (nagiosplugin), installed as console scripts."""
