"""Self-configuration: a dataset fingerprint, and the fixed rules (``recipe: auto``) that turn it
into the training values a user left unset."""

from medtl.recipe.fingerprint import Fingerprint, fingerprint
from medtl.recipe.rules import Choice, resolve_recipe

__all__ = ["Choice", "Fingerprint", "fingerprint", "resolve_recipe"]
