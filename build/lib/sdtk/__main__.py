from sdtk.cli.main import main

main()
