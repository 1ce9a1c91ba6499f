from medlake.cli.main import main

main()
