"""`python -m zinfer` is the `zinfer` command."""
from zinfer.cli.main import main

main()
