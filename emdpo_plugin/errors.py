"""User-facing errors: the CLI prints these as one line and exits non-zero, no traceback."""


class EmdpoError(Exception):
    """Base class for errors caused by user input (files, recipes, configs)."""


class DataError(EmdpoError):
    """A dataset file or row does not follow format v1."""


class RecipeError(EmdpoError):
    """A recipe, an override or a stage config is invalid."""


def yaml_error_text(exc: Exception) -> str:
    """A yaml.YAMLError as `invalid YAML at line L, column C: <problem>`, the same for every file read."""
    mark = getattr(exc, "problem_mark", None)
    at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(exc, "problem", None) or (str(exc).splitlines() or [type(exc).__name__])[0]
    return f"invalid YAML{at}: {problem}"
