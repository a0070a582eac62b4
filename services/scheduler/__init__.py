"""The scheduler service: workers and their devices, placement, and the lifecycle of model instances."""
