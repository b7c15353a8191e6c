"""User-facing errors: the CLI prints these as one line and exits non-zero, no traceback."""


class EmdpoError(Exception):
    """Base class for errors caused by user input (files, recipes, configs)."""


class DataError(EmdpoError):
    """A dataset file or row does not follow format v1."""


class RecipeError(EmdpoError):
    """A recipe, an override or a stage config is invalid."""
