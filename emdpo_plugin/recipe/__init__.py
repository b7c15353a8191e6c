"""Recipes: YAML loading (safe), `extends`, `--set` overrides, validation, the stage runner."""
