from meshnode.cli import main

main()
