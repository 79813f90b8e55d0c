"""corral: run workloads on a small fleet of Linux hosts and keep them available."""

__version__ = "0.1.0"
