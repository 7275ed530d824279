from peftcli.cli.app import main

main()
