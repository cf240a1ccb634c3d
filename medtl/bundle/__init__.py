"""Self-contained model bundles: save after training, load for evaluation and inference."""

from medtl.bundle.bundle import FORMAT, BundleError, Predictor, load, package_versions, read_meta, save

__all__ = ["FORMAT", "BundleError", "Predictor", "load", "package_versions", "read_meta", "save"]
