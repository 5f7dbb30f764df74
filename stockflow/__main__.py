from stockflow.cli import main

main()
