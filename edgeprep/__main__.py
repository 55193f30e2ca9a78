from edgeprep.cli import main

main()
