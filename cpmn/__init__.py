"""cpmn-pe: the Cross-Phase Mutual learning Network (CPMN) study pipeline for PE on non-contrast CT."""

__version__ = "0.1.0"
