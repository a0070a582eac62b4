"""The registry service: built-in and custom model definitions, validation and persistence."""
