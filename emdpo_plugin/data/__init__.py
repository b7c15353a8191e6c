"""The annotator-aware dataset format (v1): schema, readers/writers, manifest, validation."""
