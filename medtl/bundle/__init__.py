"""Self-contained model bundles: save after training, load for evaluation and inference."""

from medtl.bundle.bundle import FORMAT, BundleError, Predictor, load, package_versions, read_meta, save
from medtl.bundle.reference import FeatureReference, read_reference, reference_of
from medtl.bundle.site import SiteUpdate, adapt, bundle_hash, em_prevalence, recalibrate

__all__ = ["FORMAT", "BundleError", "FeatureReference", "Predictor", "SiteUpdate", "adapt", "bundle_hash", "em_prevalence",
           "load", "package_versions", "read_meta", "read_reference", "recalibrate", "reference_of", "save"]
