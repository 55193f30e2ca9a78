"""edgeprep: compress PyTorch models, export them to edge runtimes, and prove on each runtime
that they are still accurate and really faster."""

__version__ = "0.1.0"
