"""The broker: one ROUTER socket that routes requests to services, workers and model instances."""
