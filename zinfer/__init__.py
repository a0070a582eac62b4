"""zinfer: a model-serving mesh. Installed, every module lives under this name.

In the repository the design's folders stay at the top (shared/, services/, cli/, configs/); pyproject.toml's
package-dir maps them to zinfer.shared, zinfer.services, zinfer.cli and zinfer.configs, so a wheel holds
nothing but `zinfer` and the editable install (scripts/setup) resolves the same names to the checkout.
"""
