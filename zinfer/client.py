"""`from zinfer.client import Client`, as Xinference users write `from xinference.client import Client`."""
from zinfer.shared.client import Client

__all__ = ["Client"]
