from godwit.cli import main

main()
