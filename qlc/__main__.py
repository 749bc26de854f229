from qlc.cli import main

main()
