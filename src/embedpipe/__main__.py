from embedpipe.cli import main

main()
