"""Trainer types (recipe stages). Each algorithm loop is written once against PolicyBackend."""
