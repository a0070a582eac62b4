"""zinfer's processes: broker, registry, scheduler and inference workers."""
