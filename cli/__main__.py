from zinfer.cli.main import main

main()
