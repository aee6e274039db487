from ldae_cli.cli import main

main()
